//! A faithful fake of the two group-robot webhooks notifications are pushed into, on one
//! server: DingTalk custom robots (`POST /robot/send?access_token=…`, PROTOCOLS.md §e) and
//! WeCom group robots (`POST /cgi-bin/webhook/send?key=…`, §g).
//!
//! Like the platforms it answers HTTP 200 with `{"errcode", "errmsg"}` for every outcome and
//! enforces what they enforce: DingTalk's `SEC…` signature (timestamp within one hour, the
//! URL-encoded Base64 HMAC-SHA256 decoded from the query as DingTalk decodes it), keyword
//! security, the 20,000-byte body limit, and the rate limit of 20 messages in any 60-second
//! window, after which a DingTalk robot stays throttled for ten minutes while a WeCom robot only refuses
//! until the window has room again; WeCom's byte limits (text 2048, markdown 4096). Accepted
//! messages and refusals are recorded separately, so a test can check both what reached
//! the group and what a sender would have been told. The rate window uses the same
//! millisecond clock as [`RobotMessage::received_at_ms`], so [`max_in_any_window`] over the
//! recorded messages agrees exactly with what the fake allowed.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::query_param;
use super::record::Recorder;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::Json;
use axum::routing::post;
use serde::Serialize;
use serde_json::{Value, json};
use shared::platform::dingtalk::sign::{SignError, verify_callback};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Messages one robot may send in any [`RATE_WINDOW`] (both platforms).
pub const MESSAGES_PER_WINDOW: usize = 20;
/// The sliding window of the rate limit.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// How long DingTalk blocks a robot that exceeded the rate limit.
pub const DEFAULT_THROTTLE: Duration = Duration::from_secs(600);
/// Largest DingTalk webhook body, in bytes (errcode 460101 beyond).
pub const DINGTALK_MAX_BODY_BYTES: usize = 20_000;
/// Largest WeCom robot `text.content`, in UTF-8 bytes.
pub const WECOM_TEXT_MAX_BYTES: usize = 2048;
/// Largest WeCom robot `markdown.content`, in UTF-8 bytes.
pub const WECOM_MARKDOWN_MAX_BYTES: usize = 4096;

/// Which platform's robot a message went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RobotKind {
    /// A DingTalk custom robot.
    #[serde(rename = "dingtalk")]
    DingTalk,
    /// A WeCom group robot.
    #[serde(rename = "wecom")]
    Wecom,
}

/// A message a robot accepted (and the group would show).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RobotMessage {
    /// The robot: its DingTalk `access_token` or WeCom `key`.
    pub robot: String,
    /// The platform.
    pub kind: RobotKind,
    /// `text`, `markdown`, `link`, `actionCard`, `feedCard`, `markdown_v2`, `news`, ….
    pub msgtype: String,
    /// `text.content` or `markdown.text` / `markdown.content`; for other types the JSON of
    /// the type's object, as sent.
    pub content: String,
    /// DingTalk `markdown.title` (or the `title` of link / actionCard); `None` otherwise.
    pub title: Option<String>,
    /// DingTalk `at.atMobiles`, WeCom `text.mentioned_mobile_list`.
    pub at_mobiles: Vec<String>,
    /// DingTalk `at.atUserIds`, WeCom `text.mentioned_list`.
    pub at_user_ids: Vec<String>,
    /// DingTalk `at.isAtAll`, or `@all` in a WeCom mention list.
    pub at_all: bool,
    /// When the fake accepted it, ms since the epoch (the clock of the rate limit).
    pub received_at_ms: i64,
}

/// A request a robot refused, with the errcode it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    /// The `access_token` or `key` the request named (possibly unknown or empty).
    pub robot: String,
    /// The platform's errcode.
    pub errcode: i64,
    /// The platform's errmsg.
    pub errmsg: String,
}

/// The fake robot server; cheap to clone (all clones share one server).
#[derive(Clone)]
pub struct FakeRobots {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeRobots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeRobots")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

struct Inner {
    base_url: String,
    clock: Clock,
    state: Mutex<RobotsState>,
    received: Recorder<RobotMessage>,
    refused: Recorder<Refused>,
    stop: CancellationToken,
}

/// Wall-clock milliseconds that never go backwards: the epoch time at start plus the
/// monotonic time since.
struct Clock {
    epoch_ms_at_start: i64,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            epoch_ms_at_start: shared::now_ms(),
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.epoch_ms_at_start.saturating_add(elapsed)
    }
}

struct RobotsState {
    dingtalk: HashMap<String, DingTalkRobot>,
    wecom: HashMap<String, Window>,
    /// The rate limit's sliding window, [`RATE_WINDOW`] unless a test shortens it.
    window: Duration,
}

struct DingTalkRobot {
    secret: Option<String>,
    keywords: Vec<String>,
    window: Window,
}

/// One robot's rate limit: the accept times (ms) of the current window, and the end of a
/// throttle period.
#[derive(Debug, Default)]
struct Window {
    accepted: VecDeque<i64>,
    throttled_until_ms: Option<i64>,
}

/// Why [`Window::admit`] refused.
#[derive(Debug, PartialEq, Eq)]
enum Limited {
    /// The window already holds [`MESSAGES_PER_WINDOW`] messages.
    Full,
    /// Still in a throttle period.
    Throttled,
}

impl Window {
    fn throttled(&self, now_ms: i64) -> bool {
        self.throttled_until_ms.is_some_and(|until| now_ms < until)
    }

    /// Admits a message at `now_ms` if fewer than [`MESSAGES_PER_WINDOW`] were accepted in
    /// the `window_ms` before it; otherwise refuses and, for a non-zero `throttle_ms`,
    /// blocks the robot that long.
    fn admit(&mut self, now_ms: i64, window_ms: i64, throttle_ms: i64) -> Result<(), Limited> {
        if self.throttled(now_ms) {
            return Err(Limited::Throttled);
        }
        while self
            .accepted
            .front()
            .is_some_and(|t| now_ms - t >= window_ms)
        {
            self.accepted.pop_front();
        }
        if self.accepted.len() >= MESSAGES_PER_WINDOW {
            if throttle_ms > 0 {
                self.throttled_until_ms = Some(now_ms.saturating_add(throttle_ms));
            }
            return Err(Limited::Full);
        }
        self.accepted.push_back(now_ms);
        Ok(())
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The largest number of `robot`'s messages whose `received_at_ms` fall within one
/// `window` (any start; a message exactly `window` after another is outside its window,
/// the convention the fake's limit uses).
pub fn max_in_any_window(msgs: &[RobotMessage], robot: &str, window: Duration) -> usize {
    let mut times: Vec<i64> = msgs
        .iter()
        .filter(|m| m.robot == robot)
        .map(|m| m.received_at_ms)
        .collect();
    times.sort_unstable();
    let window_ms = duration_ms(window);
    let mut best = 0;
    let mut end = 0;
    for (start, t) in times.iter().enumerate() {
        while end < times.len() && times[end] - t < window_ms {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

/// An `{errcode, errmsg}` answer, refusal or success.
type Answer = Result<(), (i64, String)>;

fn refuse<T>(errcode: i64, errmsg: &str) -> Result<T, (i64, String)> {
    Err((errcode, errmsg.to_string()))
}

impl FakeRobots {
    /// Binds `addr` (port 0 allowed) and serves both robot kinds until [`Self::shutdown`].
    /// No robot exists until added with [`Self::add_dingtalk_robot`] /
    /// [`Self::add_wecom_robot`].
    pub async fn start(addr: SocketAddr) -> std::io::Result<FakeRobots> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let inner = Arc::new(Inner {
            base_url: format!("http://{}", super::connectable(local)),
            clock: Clock::new(),
            state: Mutex::new(RobotsState {
                dingtalk: HashMap::new(),
                wecom: HashMap::new(),
                window: RATE_WINDOW,
            }),
            received: Recorder::default(),
            refused: Recorder::default(),
            stop: CancellationToken::new(),
        });
        let router = Router::new()
            .route("/robot/send", post(dingtalk_send))
            .route("/cgi-bin/webhook/send", post(wecom_send))
            .with_state(inner.clone());
        super::serve_fake(listener, router, inner.stop.clone(), "robots");
        Ok(Self { inner })
    }

    /// Base URL, e.g. `http://127.0.0.1:9400`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    fn state(&self) -> MutexGuard<'_, RobotsState> {
        self.inner.state()
    }

    /// Adds (or resets) a DingTalk custom robot and returns its webhook URL
    /// (`{base}/robot/send?access_token=…`). With a `secret` (`SEC…`) every request must be
    /// signed; with `keywords` every message must contain one of them.
    pub fn add_dingtalk_robot(
        &self,
        access_token: &str,
        secret: Option<&str>,
        keywords: &[&str],
    ) -> String {
        self.state().dingtalk.insert(
            access_token.to_string(),
            DingTalkRobot {
                secret: secret.map(str::to_string),
                keywords: keywords
                    .iter()
                    .filter(|k| !k.is_empty())
                    .map(|k| k.to_string())
                    .collect(),
                window: Window::default(),
            },
        );
        format!(
            "{}/robot/send?access_token={}",
            self.inner.base_url,
            encode(access_token)
        )
    }

    /// Adds (or resets) a WeCom group robot and returns its webhook URL
    /// (`{base}/cgi-bin/webhook/send?key=…`).
    pub fn add_wecom_robot(&self, key: &str) -> String {
        self.state()
            .wecom
            .insert(key.to_string(), Window::default());
        format!(
            "{}/cgi-bin/webhook/send?key={}",
            self.inner.base_url,
            encode(key)
        )
    }

    /// The sliding window of the rate limit (default [`RATE_WINDOW`], 60 s): a test that
    /// gives Parley the same short `[notify] window_secs` checks the limit in seconds.
    pub fn set_window(&self, window: Duration) {
        self.state().window = window;
    }

    /// Every accepted message so far, in arrival order.
    pub fn received(&self) -> Vec<RobotMessage> {
        self.inner.received.all()
    }

    /// Waits until at least `n` messages were accepted or `timeout` passes; returns them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<RobotMessage> {
        self.inner.received.wait_for(n, timeout).await
    }

    /// Every refused request so far, in arrival order.
    pub fn refused(&self) -> Vec<Refused> {
        self.inner.refused.all()
    }

    /// Waits until at least `n` requests were refused or `timeout` passes; returns them.
    pub async fn wait_for_refused(&self, n: usize, timeout: Duration) -> Vec<Refused> {
        self.inner.refused.wait_for(n, timeout).await
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, RobotsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome and turns it into the platform's HTTP 200 answer.
    fn answer(&self, robot: &str, outcome: Answer) -> Json<Value> {
        match outcome {
            Ok(()) => Json(json!({"errcode": 0, "errmsg": "ok"})),
            Err((errcode, errmsg)) => {
                self.refused.push(Refused {
                    robot: robot.to_string(),
                    errcode,
                    errmsg: errmsg.clone(),
                });
                Json(json!({"errcode": errcode, "errmsg": errmsg}))
            }
        }
    }
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Strings of a JSON array field; non-strings are ignored.
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A JSON bool, also given as the string `"true"` (DingTalk's JSON binding coerces it).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// A non-empty string field.
fn non_empty(v: &Value) -> Option<&str> {
    v.as_str().filter(|s| !s.trim().is_empty())
}

/// All string leaves of `v`, newline-joined: what keyword security searches in card types.
fn all_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| all_text(x, out)),
        Value::Object(o) => o.values().for_each(|x| all_text(x, out)),
        _ => {}
    }
}

/// What a DingTalk body carries, once validated.
struct DingTalkBody {
    msgtype: String,
    content: String,
    title: Option<String>,
    /// The text keyword security searches.
    searchable: String,
}

/// Validates a DingTalk webhook body like DingTalk does. Codes for missing fields follow
/// what DingTalk has been seen to answer (`40035` unparseable JSON, `400402`/`400403`
/// missing `markdown.title`/`markdown.text`); `400401` for a missing `text.content` and
/// `40035` for an unknown `msgtype` are by analogy.
fn parse_dingtalk(v: &Value) -> Result<DingTalkBody, (i64, String)> {
    let msgtype = v["msgtype"].as_str().unwrap_or_default().to_string();
    match msgtype.as_str() {
        "text" => {
            let Some(content) = non_empty(&v["text"]["content"]) else {
                return refuse(400401, "miss param : text->content");
            };
            Ok(DingTalkBody {
                content: content.to_string(),
                title: None,
                searchable: content.to_string(),
                msgtype,
            })
        }
        "markdown" => {
            let Some(title) = non_empty(&v["markdown"]["title"]) else {
                return refuse(400402, "miss param : markdown->title");
            };
            let Some(text) = non_empty(&v["markdown"]["text"]) else {
                return refuse(400403, "miss param : markdown->text");
            };
            Ok(DingTalkBody {
                content: text.to_string(),
                title: Some(title.to_string()),
                searchable: format!("{title}\n{text}"),
                msgtype,
            })
        }
        "link" | "actionCard" | "feedCard" => {
            let object = &v[msgtype.as_str()];
            if !object.is_object() {
                return refuse(40035, &format!("缺少参数 {msgtype}"));
            }
            let mut searchable = String::new();
            all_text(object, &mut searchable);
            Ok(DingTalkBody {
                content: object.to_string(),
                title: object["title"].as_str().map(str::to_string),
                searchable,
                msgtype,
            })
        }
        _ => refuse(40035, "缺少参数 msgtype"),
    }
}

async fn dingtalk_send(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Json<Value> {
    let token = query_param(query.as_deref(), "access_token").unwrap_or_default();
    let outcome = dingtalk_accept(&inner, &token, query.as_deref(), &body);
    inner.answer(&token, outcome)
}

/// Every check of DingTalk's, in its order: robot, size, signature, throttle, body,
/// keywords, rate window. Records an accepted message before answering.
fn dingtalk_accept(inner: &Inner, token: &str, query: Option<&str>, body: &[u8]) -> Answer {
    let mut state = inner.state();
    let throttle_ms = duration_ms(DEFAULT_THROTTLE);
    let window_ms = duration_ms(state.window);
    let Some(robot) = state.dingtalk.get_mut(token) else {
        return refuse(300001, "token is not exist");
    };
    if body.len() > DINGTALK_MAX_BODY_BYTES {
        return refuse(460101, "message too long, exceed 20000 bytes");
    }
    let now_ms = inner.clock.now_ms();
    if let Some(secret) = &robot.secret {
        let timestamp = query_param(query, "timestamp");
        let sign = query_param(query, "sign");
        match verify_callback(secret, timestamp.as_deref(), sign.as_deref(), now_ms) {
            Ok(()) => {}
            Err(SignError::StaleTimestamp | SignError::MalformedTimestamp) => {
                return refuse(310000, "invalid timestamp");
            }
            Err(SignError::MissingHeader | SignError::SignatureMismatch) => {
                return refuse(310000, "sign not match");
            }
        }
    }
    if robot.window.throttled(now_ms) {
        return refuse(130101, "send too fast, exceed 20 times per minute");
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return refuse(40035, "缺少参数 json");
    };
    let parsed = parse_dingtalk(&v)?;
    if !robot.keywords.is_empty()
        && !robot
            .keywords
            .iter()
            .any(|k| parsed.searchable.contains(k.as_str()))
    {
        return refuse(310000, "keywords not in content");
    }
    if robot.window.admit(now_ms, window_ms, throttle_ms).is_err() {
        return refuse(130101, "send too fast, exceed 20 times per minute");
    }
    let at = &v["at"];
    inner.received.push(RobotMessage {
        robot: token.to_string(),
        kind: RobotKind::DingTalk,
        msgtype: parsed.msgtype,
        content: parsed.content,
        title: parsed.title,
        at_mobiles: strings(&at["atMobiles"]),
        at_user_ids: strings(&at["atUserIds"]),
        at_all: truthy(&at["isAtAll"]),
        received_at_ms: now_ms,
    });
    Ok(())
}

async fn wecom_send(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Json<Value> {
    let key = query_param(query.as_deref(), "key").unwrap_or_default();
    let outcome = wecom_accept(&inner, &key, &body);
    inner.answer(&key, outcome)
}

/// A length check of WeCom's: `40058 "<field> exceed max length <max>"`.
fn wecom_content<'a>(v: &'a Value, field: &str, max: usize) -> Result<&'a str, (i64, String)> {
    let Some(content) = non_empty(&v[field]["content"]) else {
        return refuse(44004, "empty content");
    };
    if content.len() > max {
        return refuse(40058, &format!("{field}.content exceed max length {max}"));
    }
    Ok(content)
}

/// Every check of WeCom's: robot key, body, byte limits, rate window.
fn wecom_accept(inner: &Inner, key: &str, body: &[u8]) -> Answer {
    let mut state = inner.state();
    let window_ms = duration_ms(state.window);
    let Some(window) = state.wecom.get_mut(key) else {
        return refuse(93000, "invalid webhook url");
    };
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return refuse(47001, "data format error");
    };
    let msgtype = v["msgtype"].as_str().unwrap_or_default().to_string();
    let (content, at_mobiles, at_user_ids) = match msgtype.as_str() {
        "text" => {
            let content = wecom_content(&v, "text", WECOM_TEXT_MAX_BYTES)?;
            (
                content.to_string(),
                strings(&v["text"]["mentioned_mobile_list"]),
                strings(&v["text"]["mentioned_list"]),
            )
        }
        "markdown" | "markdown_v2" => {
            let content = wecom_content(&v, &msgtype, WECOM_MARKDOWN_MAX_BYTES)?;
            (content.to_string(), Vec::new(), Vec::new())
        }
        "image" | "news" | "file" | "voice" | "template_card" => {
            let object = &v[msgtype.as_str()];
            if !object.is_object() {
                return refuse(40035, "invalid args");
            }
            (object.to_string(), Vec::new(), Vec::new())
        }
        _ => return refuse(40008, "invalid message type"),
    };
    let now_ms = inner.clock.now_ms();
    if window.admit(now_ms, window_ms, 0).is_err() {
        return refuse(45009, "api freq out of limit");
    }
    let at_all = at_mobiles.iter().chain(&at_user_ids).any(|m| m == "@all");
    inner.received.push(RobotMessage {
        robot: key.to_string(),
        kind: RobotKind::Wecom,
        msgtype,
        content,
        title: None,
        at_mobiles,
        at_user_ids,
        at_all,
        received_at_ms: now_ms,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::platform::dingtalk::sign::{MAX_SKEW_MS, sign, webhook_query};

    /// The `typical_SEC_secret` case of tests/vectors/dingtalk_webhook_sign.json.
    const SECRET: &str = "SEC5pxjtwodlhcvylmr2rjdzc399wegfqaw8cnemmwzuk8lmhiaqes1mnggenlnsntl";

    async fn fake() -> FakeRobots {
        FakeRobots::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (i64, String) {
        let resp = client.post(url).json(body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        (
            v["errcode"].as_i64().unwrap(),
            v["errmsg"].as_str().unwrap().to_string(),
        )
    }

    fn text(content: &str) -> Value {
        json!({"msgtype": "text", "text": {"content": content}})
    }

    fn ok() -> (i64, String) {
        (0, "ok".to_string())
    }

    #[test]
    fn the_vector_signs_as_the_fake_verifies() {
        let v: Value = serde_json::from_str(include_str!(
            "../../tests/vectors/dingtalk_webhook_sign.json"
        ))
        .unwrap();
        let case = &v["cases"][1];
        assert_eq!(case["secret"], SECRET);
        let query = format!(
            "access_token=ACCESS_TOKEN&{}",
            webhook_query(SECRET, 1_700_000_000_000)
        );
        let sign = query_param(Some(&query), "sign").unwrap();
        assert_eq!(sign, case["expected_sign_raw_base64"].as_str().unwrap());
        assert!(
            verify_callback(
                SECRET,
                Some("1700000000000"),
                Some(&sign),
                1_700_000_000_000
            )
            .is_ok()
        );
    }

    #[tokio::test]
    async fn signed_dingtalk_push_is_accepted_and_recorded() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_dingtalk_robot("tok-signed", Some(SECRET), &[]);
        assert_eq!(
            url,
            format!("{}/robot/send?access_token=tok-signed", robots.base_url())
        );
        let signed = format!("{url}&{}", webhook_query(SECRET, shared::now_ms()));
        let body = json!({
            "msgtype": "markdown",
            "markdown": {"title": "[FIRING:1] DiskFull", "text": "### DiskFull\n\n@13800000000"},
            "at": {"atMobiles": ["13800000000"], "atUserIds": ["u1"], "isAtAll": false}
        });
        assert_eq!(post(&client, &signed, &body).await, ok());
        let got = robots.wait_for(1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1);
        let m = &got[0];
        assert_eq!(m.robot, "tok-signed");
        assert_eq!(m.kind, RobotKind::DingTalk);
        assert_eq!(m.msgtype, "markdown");
        assert_eq!(m.title.as_deref(), Some("[FIRING:1] DiskFull"));
        assert_eq!(m.content, "### DiskFull\n\n@13800000000");
        assert_eq!(m.at_mobiles, ["13800000000"]);
        assert_eq!(m.at_user_ids, ["u1"]);
        assert!(!m.at_all);
        assert!((m.received_at_ms - shared::now_ms()).abs() < 5_000);
        assert!(robots.refused().is_empty());
    }

    #[tokio::test]
    async fn bad_or_stale_signatures_get_310000() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_dingtalk_robot("tok", Some(SECRET), &[]);
        let now = shared::now_ms();
        let sign_not_match = (310000, "sign not match".to_string());
        // Unsigned, wrong secret, and double-encoded.
        assert_eq!(post(&client, &url, &text("hi")).await, sign_not_match);
        let wrong = format!("{url}&{}", webhook_query("SECother", now));
        assert_eq!(post(&client, &wrong, &text("hi")).await, sign_not_match);
        let good = webhook_query(SECRET, now);
        let double = format!("{url}&{}", good.replace('%', "%25"));
        assert_eq!(post(&client, &double, &text("hi")).await, sign_not_match);
        // A '+' left unencoded arrives as a space.
        let ts = (now..now + 1000)
            .find(|t| sign(SECRET, &t.to_string()).contains('+'))
            .unwrap();
        let raw = format!(
            "{url}&timestamp={ts}&sign={}",
            sign(SECRET, &ts.to_string())
        );
        assert_eq!(post(&client, &raw, &text("hi")).await, sign_not_match);
        // Correctly signed but more than an hour old.
        let stale = format!(
            "{url}&{}",
            webhook_query(SECRET, now - MAX_SKEW_MS - 60_000)
        );
        assert_eq!(
            post(&client, &stale, &text("hi")).await,
            (310000, "invalid timestamp".to_string())
        );
        assert!(robots.received().is_empty());
        let refused = robots.refused();
        assert_eq!(refused.len(), 5);
        assert!(
            refused
                .iter()
                .all(|r| r.robot == "tok" && r.errcode == 310000)
        );
    }

    #[tokio::test]
    async fn keyword_security_and_dingtalk_errors() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_dingtalk_robot("kw", None, &["告警", "alert"]);
        assert_eq!(
            post(&client, &url, &text("deploy finished")).await,
            (310000, "keywords not in content".to_string())
        );
        assert_eq!(post(&client, &url, &text("disk alert on db-1")).await, ok());
        let md = json!({"msgtype": "markdown", "markdown": {"title": "告警", "text": "disk full"}});
        assert_eq!(post(&client, &url, &md).await, ok());
        let untitled = json!({"msgtype": "markdown", "markdown": {"text": "alert"}});
        assert_eq!(post(&client, &url, &untitled).await.0, 400402);
        let big = text(&format!("alert {}", "x".repeat(DINGTALK_MAX_BODY_BYTES)));
        assert_eq!(post(&client, &url, &big).await.0, 460101);
        let unknown = format!("{}/robot/send?access_token=nope", robots.base_url());
        assert_eq!(
            post(&client, &unknown, &text("alert")).await,
            (300001, "token is not exist".to_string())
        );
        let resp = client.post(&url).body("not json").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["errcode"], 40035);
        let link = json!({"msgtype": "link", "link": {"title": "alert", "text": "t", "messageUrl": "http://x"}});
        assert_eq!(post(&client, &url, &link).await, ok());
        let got = robots.received();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].msgtype, "link");
        assert_eq!(got[2].title.as_deref(), Some("alert"));
        assert!(got[2].content.contains("messageUrl"));
    }

    #[tokio::test]
    async fn dingtalk_21st_message_in_a_minute_is_throttled_and_stays_so() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_dingtalk_robot("busy", Some(SECRET), &[]);
        let too_fast = (
            130101,
            "send too fast, exceed 20 times per minute".to_string(),
        );
        for i in 0..MESSAGES_PER_WINDOW {
            let signed = format!("{url}&{}", webhook_query(SECRET, shared::now_ms()));
            assert_eq!(post(&client, &signed, &text(&format!("m{i}"))).await, ok());
        }
        let signed = format!("{url}&{}", webhook_query(SECRET, shared::now_ms()));
        assert_eq!(post(&client, &signed, &text("m20")).await, too_fast);
        // Throttled: refused even before looking at the body.
        assert_eq!(post(&client, &signed, &json!({})).await, too_fast);
        // Other robots are unaffected.
        let other = robots.add_dingtalk_robot("calm", None, &[]);
        assert_eq!(post(&client, &other, &text("hi")).await, ok());
        let got = robots.received();
        assert_eq!(got.len(), MESSAGES_PER_WINDOW + 1);
        assert_eq!(max_in_any_window(&got, "busy", RATE_WINDOW), 20);
        assert_eq!(robots.refused().len(), 2);
    }

    #[tokio::test]
    async fn wecom_limits_unknown_key_and_mentions() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_wecom_robot("k-1");
        assert_eq!(
            url,
            format!("{}/cgi-bin/webhook/send?key=k-1", robots.base_url())
        );
        // 4096 bytes of three-byte characters plus one more: over by bytes, not chars.
        let long = "告".repeat(WECOM_MARKDOWN_MAX_BYTES / 3 + 1);
        let md = |c: &str| json!({"msgtype": "markdown", "markdown": {"content": c}});
        assert_eq!(
            post(&client, &url, &md(&long)).await,
            (40058, "markdown.content exceed max length 4096".to_string())
        );
        let exact = "x".repeat(WECOM_MARKDOWN_MAX_BYTES);
        assert_eq!(post(&client, &url, &md(&exact)).await, ok());
        let long_text = json!({"msgtype": "text", "text": {"content": "x".repeat(2049)}});
        assert_eq!(
            post(&client, &url, &long_text).await,
            (40058, "text.content exceed max length 2048".to_string())
        );
        let mention = json!({"msgtype": "text", "text": {
            "content": "disk full", "mentioned_list": ["zhangsan", "@all"],
            "mentioned_mobile_list": ["13800000000"]}});
        assert_eq!(post(&client, &url, &mention).await, ok());
        let unknown = format!("{}/cgi-bin/webhook/send?key=nope", robots.base_url());
        assert_eq!(
            post(&client, &unknown, &md("hi")).await,
            (93000, "invalid webhook url".to_string())
        );
        let got = robots.received();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].kind, RobotKind::Wecom);
        assert_eq!(got[0].content.len(), WECOM_MARKDOWN_MAX_BYTES);
        assert_eq!(got[1].at_user_ids, ["zhangsan", "@all"]);
        assert_eq!(got[1].at_mobiles, ["13800000000"]);
        assert!(got[1].at_all);
        let refused = robots.refused();
        assert_eq!(refused.len(), 3);
        assert_eq!(refused[2].robot, "nope");
    }

    #[tokio::test]
    async fn wecom_21st_message_in_a_minute_gets_45009() {
        let robots = fake().await;
        let client = reqwest::Client::new();
        let url = robots.add_wecom_robot("k-busy");
        for i in 0..MESSAGES_PER_WINDOW {
            assert_eq!(post(&client, &url, &text(&format!("m{i}"))).await, ok());
        }
        let freq = (45009, "api freq out of limit".to_string());
        assert_eq!(post(&client, &url, &text("m20")).await, freq);
        assert_eq!(post(&client, &url, &text("m21")).await, freq);
        let got = robots.wait_for(20, Duration::from_secs(5)).await;
        assert_eq!(max_in_any_window(&got, "k-busy", RATE_WINDOW), 20);
    }

    #[test]
    fn window_is_exact_and_throttle_outlasts_it() {
        let throttle = duration_ms(Duration::from_secs(600));
        let window = duration_ms(RATE_WINDOW);
        let mut w = Window::default();
        for i in 0..20 {
            assert_eq!(w.admit(i * 1000, window, throttle), Ok(()));
        }
        // The 21st within 60 s of the first is refused and throttles the robot.
        assert_eq!(w.admit(59_999, window, throttle), Err(Limited::Full));
        assert_eq!(w.admit(60_000, window, throttle), Err(Limited::Throttled));
        assert_eq!(w.admit(659_998, window, throttle), Err(Limited::Throttled));
        assert_eq!(w.admit(659_999, window, throttle), Ok(()));

        // Without a throttle (WeCom) the window alone decides, to the millisecond.
        let mut w = Window::default();
        for i in 0..20 {
            assert_eq!(w.admit(i * 1000, window, 0), Ok(()));
        }
        assert_eq!(w.admit(59_999, window, 0), Err(Limited::Full));
        assert_eq!(w.admit(60_000, window, 0), Ok(()));
        assert_eq!(w.admit(60_001, window, 0), Err(Limited::Full));
        assert_eq!(w.admit(61_000, window, 0), Ok(()));
    }

    #[test]
    fn max_in_any_window_counts_per_robot() {
        let msg = |robot: &str, t: i64| RobotMessage {
            robot: robot.into(),
            kind: RobotKind::Wecom,
            msgtype: "text".into(),
            content: String::new(),
            title: None,
            at_mobiles: vec![],
            at_user_ids: vec![],
            at_all: false,
            received_at_ms: t,
        };
        let mut msgs: Vec<RobotMessage> = (0..45).map(|i| msg("a", i * 3_000)).collect();
        msgs.push(msg("b", 1));
        msgs.reverse();
        assert_eq!(max_in_any_window(&msgs, "a", RATE_WINDOW), 20);
        assert_eq!(
            max_in_any_window(&msgs, "a", Duration::from_millis(60_001)),
            21
        );
        assert_eq!(max_in_any_window(&msgs, "b", RATE_WINDOW), 1);
        assert_eq!(max_in_any_window(&msgs, "c", RATE_WINDOW), 0);
    }
}
