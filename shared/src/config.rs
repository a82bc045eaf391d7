//! Configuration: one TOML file (`--config FILE`, or `PARLEY_CONFIG`), typed and validated
//! at start-up. Any string value may be `${ENV_VAR}` (or contain it), so secrets come from
//! the environment, not the file. Every problem is reported as one line that names the key,
//! e.g. `config: bots[0].app_secret: environment variable DT_SECRET is not set`, because the
//! person reading it is an operator looking at a crash-looping pod.

use crate::job::Platform;
use crate::secret::Secret;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `llm.base_url` or `bots[1].id`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP listeners.
    #[serde(default)]
    pub server: ServerSettings,
    /// Job queue backend.
    #[serde(default)]
    pub queue: QueueSettings,
    /// Cache backend.
    #[serde(default)]
    pub cache: CacheSettings,
    /// The model.
    pub llm: LlmSettings,
    /// Conversation memory.
    #[serde(default)]
    pub history: HistorySettings,
    /// How long an answer may take, and what each chatter may use.
    #[serde(default)]
    pub limits: LimitSettings,
    /// Chat bots.
    #[serde(default, deserialize_with = "bots_with_policy")]
    pub bots: Vec<BotSettings>,
    /// Notification delivery.
    #[serde(default)]
    pub notify: NotifySettings,
    /// Group robots notifications are pushed into.
    #[serde(default)]
    pub channels: Vec<ChannelSettings>,
}

/// `[notify]`: how notifications are delivered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySettings {
    /// Notifications delivered at once per worker process (one per robot at a time,
    /// in order). Default 8.
    pub max_concurrency: usize,
    /// A minijinja template file rendering Alertmanager payloads as markdown; absent = the
    /// built-in template.
    pub alertmanager_template: Option<String>,
    /// The robots' rate-limit window in seconds: each channel sends at most
    /// `messages_per_minute` in any such window. Default 60, the platforms' window; shorter
    /// only for tests and benchmarks against the fakes.
    pub window_secs: u64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            max_concurrency: 8,
            alertmanager_template: None,
            window_secs: 60,
        }
    }
}

impl NotifySettings {
    /// The robots' rate-limit window.
    pub fn window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.window_secs)
    }
}

/// The kinds of group robot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// A DingTalk custom robot (自定义机器人): `https://oapi.dingtalk.com/robot/send?access_token=…`.
    DingtalkRobot,
    /// A WeCom group robot (群机器人): `https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=…`.
    WecomRobot,
}

/// `[[channels]]`: one group robot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    /// Route id: callers POST to `/notify/{id}`.
    pub id: String,
    /// Which platform's robot.
    pub kind: ChannelKind,
    /// The robot's full webhook URL, including its access_token / key.
    pub url: Secret,
    /// DingTalk signing secret (`SEC…`), if the robot uses signature security.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// DingTalk keyword security: added to every message that lacks it.
    #[serde(default)]
    pub keyword: Option<String>,
    /// The bearer token callers must present.
    pub token: Secret,
    /// Mobiles @-mentioned by default.
    #[serde(default)]
    pub at_mobiles: Vec<String>,
    /// User ids @-mentioned by default.
    #[serde(default)]
    pub at_user_ids: Vec<String>,
    /// @all by default.
    #[serde(default)]
    pub at_all: bool,
    /// Messages per minute the robot accepts (both platforms document 20). Default 20.
    #[serde(default = "default_robot_rate")]
    pub messages_per_minute: u32,
}

fn default_robot_rate() -> u32 {
    20
}

/// `[server]`: where the ingress and the admin endpoints listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Public listener for platform callbacks. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Admin listener for `/healthz`, `/readyz`, `/metrics`. Default `127.0.0.1:9090`.
    pub admin_listen: SocketAddr,
    /// Largest callback body accepted, in bytes. Default 65536.
    pub body_limit_bytes: usize,
    /// How long a notification's `Idempotency-Key` is remembered, in seconds. Default 3600.
    pub dedupe_ttl_secs: u64,
    /// After SIGTERM/SIGINT, how long jobs already being worked on may run on before they
    /// are abandoned unsettled (to be redelivered), in seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// Time a client has to send a request's headers, and that a kept-alive HTTP/1
    /// connection may wait for its next request, in seconds. Default 10.
    pub header_timeout_secs: u64,
    /// Time a client has to send a request's body once its headers are in (408 after), in
    /// seconds. Default 10.
    pub body_timeout_secs: u64,
    /// A connection with no byte read or written for this long is closed, in seconds.
    /// Default 60.
    pub idle_timeout_secs: u64,
    /// Largest request head (request line and headers) accepted, in bytes (431 beyond).
    /// Default 16384; at least 8192.
    pub max_header_bytes: usize,
    /// Connections open at once on the public listener; at the cap the connection idle the
    /// longest is closed to make room. Default 10000.
    pub max_connections: usize,
    /// HTTP/2 (cleartext, prior knowledge) streams one connection may have open. Default 64.
    pub http2_max_streams: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            body_limit_bytes: 64 * 1024,
            dedupe_ttl_secs: 3600,
            shutdown_grace_secs: 30,
            header_timeout_secs: 10,
            body_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            http2_max_streams: 64,
        }
    }
}

/// Default of `[queue] shards`.
pub const DEFAULT_SHARDS: u16 = 8;
/// Most shard queues a deployment may declare (each is a quorum queue, a Raft group).
pub const MAX_SHARDS: u16 = 256;

/// `[queue]`: the job queue. Without `url` an embedded in-process queue is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// AMQP URL of RabbitMQ (`amqp://user:pass@host:5672/vhost`); absent = embedded.
    pub url: Option<Secret>,
    /// Embedded queue bound: callbacks beyond it get 503 so the platform retries. Default 100000.
    pub capacity: usize,
    /// Delivery attempts before a job is dead-lettered. Default 5.
    pub max_attempts: u32,
    /// Prefix of every exchange and queue name, so deployments (and test runs) can share
    /// one broker. Default `parley`.
    pub prefix: String,
    /// How long the ingress waits for the broker's publish confirm before answering 503,
    /// in milliseconds. Default 2000.
    pub confirm_timeout_ms: u64,
    /// Delays before the 1st, 2nd, … retry of a job, in seconds, ascending; the last one
    /// repeats. The broker backend declares one delay queue per value, so every process
    /// sharing a prefix must use the same list. Default `[5, 30, 120, 600]`.
    pub retry_delays_secs: Vec<u64>,
    /// Shard queues of the broker backend (1–256): a conversation's jobs always go to the
    /// same shard, and each shard is worked by one worker process at a time, so they are
    /// answered in order; at most this many worker processes are busy at once. Every
    /// process sharing a prefix must use the same number. Default 8.
    pub shards: u16,
    /// The data directory of the embedded queue and cache (`parley serve` without a
    /// broker or without Redis): jobs, dead letters, answered markers and the rest live
    /// there, so a crash loses nothing accepted. Relative to the working directory; one
    /// process per directory. Default `parley-data`.
    pub path: PathBuf,
    /// Whether every commit to the data directory also waits for the disk (survives a power
    /// loss, not only a crash of the process; slower). Default false.
    pub fsync: bool,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            url: None,
            capacity: 100_000,
            max_attempts: 5,
            prefix: "parley".into(),
            confirm_timeout_ms: 2000,
            retry_delays_secs: crate::queue::RETRY_TIERS_SECS.to_vec(),
            shards: DEFAULT_SHARDS,
            path: PathBuf::from("parley-data"),
            fsync: false,
        }
    }
}

/// `[cache]`: the cache. Without `url` an embedded in-process map is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Redis URL (`redis://host:6379/0`); absent = embedded.
    pub url: Option<Secret>,
    /// Prefix of every key, so several deployments can share one Redis. Default `parley`.
    pub key_prefix: String,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "parley".into(),
        }
    }
}

/// `[llm]`: the OpenAI-compatible model endpoint and how hard to drive it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// Base URL; `/chat/completions` is appended (e.g. `https://api.openai.com/v1`). The
    /// one-upstream form: required unless `[[llm.upstreams]]` are given.
    #[serde(default)]
    pub base_url: String,
    /// Bearer key; may be empty for local servers that need none.
    #[serde(default)]
    pub api_key: Secret,
    /// Model name sent in every request.
    pub model: String,
    /// System prompt put before every conversation.
    #[serde(default = "default_system_prompt")]
    pub system_prompt: String,
    /// Model calls per minute for the whole deployment (with `[cache] url` every worker
    /// draws from one limit in Redis); 0 = off. Default 600.
    #[serde(default = "default_rpm")]
    pub requests_per_minute: u32,
    /// Model tokens (prompt + completion) per minute for the whole deployment, estimated
    /// before a call and corrected by its `usage`; 0 (default) = off.
    #[serde(default)]
    pub tokens_per_minute: u32,
    /// Jobs in flight per worker process (also the queue prefetch). Default 64.
    #[serde(default = "default_concurrency")]
    pub max_concurrency: usize,
    /// Timeout of one model call, in seconds. Default 60.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries of one model call on 429/5xx/timeouts. Default 2.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Optional `max_tokens` sent with each request.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Optional sampling temperature (0–2).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// `[[llm.upstreams]]`: the model endpoints in order of preference; the first healthy
    /// one serves a call. Empty (default) = one, from `base_url`, `api_key` and `model`.
    #[serde(default)]
    pub upstreams: Vec<UpstreamSettings>,
    /// A proxy every upstream is reached through unless it has its own: `http://`,
    /// `https://` or `socks5://` (credentials in the URL allowed).
    #[serde(default)]
    pub proxy: Option<Secret>,
    /// Seconds an upstream's circuit stays open after repeated failures before one call
    /// probes it again. Default 30.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_secs: u64,
}

impl LlmSettings {
    /// The upstreams in order: the configured ones, or the one of `base_url`, `api_key` and
    /// `model` (named "default").
    pub fn upstream_list(&self) -> Vec<UpstreamSettings> {
        if !self.upstreams.is_empty() {
            return self.upstreams.clone();
        }
        vec![UpstreamSettings {
            name: "default".into(),
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
            model: None,
            kind: UpstreamKind::OpenAi,
            api_version: None,
            timeout_secs: None,
            proxy: None,
        }]
    }
}

/// `[[llm.upstreams]]`: one model endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Name in logs, metrics, `/status` and a bot's `upstream`.
    pub name: String,
    /// Base URL: `…/v1` for `openai`, the resource (`https://NAME.openai.azure.com`) for
    /// `azure`.
    pub base_url: String,
    /// Key: a bearer token (`openai`) or the `api-key` header (`azure`).
    #[serde(default)]
    pub api_key: Secret,
    /// Model (Azure: the deployment); default `[llm] model`.
    #[serde(default)]
    pub model: Option<String>,
    /// `openai` (default: any OpenAI-compatible endpoint) or `azure`.
    #[serde(default)]
    pub kind: UpstreamKind,
    /// Azure's `api-version`; default 2024-10-21.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Timeout of one call to it, seconds; default `[llm] timeout_secs`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// The proxy it is reached through (`http://`, `https://`, `socks5://`); default
    /// `[llm] proxy`.
    #[serde(default)]
    pub proxy: Option<Secret>,
}

/// The request shape an upstream speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum UpstreamKind {
    /// `{base_url}/chat/completions`, `Authorization: Bearer`.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// `{base_url}/openai/deployments/{model}/chat/completions?api-version=…`, `api-key`.
    #[serde(rename = "azure")]
    Azure,
}

fn default_system_prompt() -> String {
    "You are a helpful assistant in a workplace chat. Answer concisely.".into()
}
fn default_breaker_cooldown() -> u64 {
    30
}
fn default_rpm() -> u32 {
    600
}
fn default_concurrency() -> usize {
    64
}
fn default_timeout() -> u64 {
    60
}
fn default_retries() -> u32 {
    2
}

/// `[limits]`: how late an answer may be, and per-chatter quotas (0 = off), cluster-wide.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Seconds from a message's arrival after which an answer is too late: a message whose
    /// model call could not start by then is answered "busy, try again shortly" at once.
    /// Default 120.
    pub max_wait_secs: u64,
    /// Messages a chatter may send in any minute.
    pub user_messages_per_minute: u32,
    /// Messages a chatter may send a day (Asia/Shanghai).
    pub user_messages_per_day: u32,
    /// Model tokens a chatter may use a day (Asia/Shanghai).
    pub user_tokens_per_day: u64,
    /// The answer to a chatter over a quota.
    pub quota_reply: String,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_wait_secs: 120,
            user_messages_per_minute: 0,
            user_messages_per_day: 0,
            user_tokens_per_day: 0,
            quota_reply: "您今天的提问次数或用量已达上限，请稍后再试。\
(You have reached your usage limit for now. Please try again later.)"
                .into(),
        }
    }
}

/// `[history]`: what the assistant remembers of a conversation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Turns kept (a turn = one question and its answer). Default 10.
    pub max_turns: usize,
    /// Characters of history sent to the model at most (oldest dropped first). Default 6000.
    pub max_chars: usize,
    /// A conversation idle this long (seconds) is forgotten. Default 3600.
    pub idle_ttl_secs: u64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            max_turns: 10,
            max_chars: 6000,
            idle_ttl_secs: 3600,
        }
    }
}

impl ChannelKind {
    /// The platform a channel's notifications travel on.
    pub fn platform(self) -> Platform {
        match self {
            ChannelKind::DingtalkRobot => Platform::DingTalkRobot,
            ChannelKind::WecomRobot => Platform::WecomRobot,
        }
    }
}

/// `[[bots]]`: one chat bot.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "platform", rename_all = "lowercase")]
pub enum BotSettings {
    /// An enterprise-internal DingTalk robot (HTTP callback mode).
    DingTalk(DingTalkBot),
    /// A WeCom self-built app (encrypted callbacks, `message/send` replies).
    Wecom(WecomBot),
    /// A WeCom AI bot (智能机器人, API mode): encrypted JSON callbacks, answers streamed
    /// through passive replies, `response_url` as the fallback.
    #[serde(rename = "wecom_aibot")]
    WecomAibot(WecomAibotBot),
}

impl BotSettings {
    /// The bot's id, the last segment of its callback route.
    pub fn id(&self) -> &str {
        match self {
            BotSettings::DingTalk(b) => &b.id,
            BotSettings::Wecom(b) => &b.id,
            BotSettings::WecomAibot(b) => &b.id,
        }
    }

    /// The first segment of the bot's callback route: WeCom apps and AI bots share
    /// `/wecom/{id}`, so their ids must differ.
    pub fn route(&self) -> &'static str {
        match self {
            BotSettings::DingTalk(_) => "dingtalk",
            BotSettings::Wecom(_) | BotSettings::WecomAibot(_) => "wecom",
        }
    }

    /// Who may use the bot.
    pub fn policy(&self) -> &BotPolicy {
        match self {
            BotSettings::DingTalk(b) => &b.policy,
            BotSettings::Wecom(b) => &b.policy,
            BotSettings::WecomAibot(b) => &b.policy,
        }
    }

    fn policy_mut(&mut self) -> &mut BotPolicy {
        match self {
            BotSettings::DingTalk(b) => &mut b.policy,
            BotSettings::Wecom(b) => &mut b.policy,
            BotSettings::WecomAibot(b) => &mut b.policy,
        }
    }

    /// The bot's platform.
    pub fn platform(&self) -> Platform {
        match self {
            BotSettings::DingTalk(_) => Platform::DingTalk,
            BotSettings::Wecom(_) => Platform::Wecom,
            BotSettings::WecomAibot(_) => Platform::WecomAibot,
        }
    }
}

/// Who may use a bot, who may see its state, and how it answers: `[[bots]]` keys every
/// platform has.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BotPolicy {
    /// Answer one-to-one chats. Default true.
    pub dm: bool,
    /// Answer group chats. Default true.
    pub groups: bool,
    /// Platform user ids allowed to use the bot; empty (default) = everyone.
    pub allow_users: Vec<String>,
    /// Platform user ids never answered.
    pub deny_users: Vec<String>,
    /// Conversation ids the bot answers in (DingTalk conversationId, WeCom AI bot chatid;
    /// for WeCom one-to-one chats the user's id); empty (default) = every one.
    pub allow_conversations: Vec<String>,
    /// Conversation ids never answered in.
    pub deny_conversations: Vec<String>,
    /// The answer to a message that is not allowed; absent (default) = no answer at all.
    pub deny_reply: Option<String>,
    /// Platform user ids who may use `/status` and whose own quota is unlimited.
    pub admin_users: Vec<String>,
    /// The model this bot asks instead of `[llm] model`.
    pub model: Option<String>,
    /// The system prompt of this bot instead of `[llm] system_prompt`.
    pub system_prompt: Option<String>,
    /// The `[[llm.upstreams]]` name this bot asks first (the others stay its failover).
    pub upstream: Option<String>,
    /// `[[bots.conversations]]`: one group's or chat's own model or system prompt.
    pub conversations: Vec<ConversationSettings>,
}

/// What a bot or one of its conversations asks differently from `[llm]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides<'a> {
    /// The model.
    pub model: Option<&'a str>,
    /// The system prompt.
    pub system_prompt: Option<&'a str>,
    /// The upstream asked first.
    pub upstream: Option<&'a str>,
}

/// `[[bots.conversations]]`: what one conversation of a bot does differently.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationSettings {
    /// The conversation's platform id (as in `allow_conversations`).
    pub id: String,
    /// The model asked in this conversation.
    #[serde(default)]
    pub model: Option<String>,
    /// The system prompt in this conversation.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// The upstream asked first in this conversation.
    #[serde(default)]
    pub upstream: Option<String>,
}

impl Default for BotPolicy {
    fn default() -> Self {
        Self {
            dm: true,
            groups: true,
            allow_users: Vec::new(),
            deny_users: Vec::new(),
            allow_conversations: Vec::new(),
            deny_conversations: Vec::new(),
            deny_reply: None,
            admin_users: Vec::new(),
            model: None,
            system_prompt: None,
            upstream: None,
            conversations: Vec::new(),
        }
    }
}

impl BotPolicy {
    /// The `[[bots]]` keys this holds.
    const KEYS: [&str; 12] = [
        "dm",
        "groups",
        "allow_users",
        "deny_users",
        "allow_conversations",
        "deny_conversations",
        "deny_reply",
        "admin_users",
        "model",
        "system_prompt",
        "upstream",
        "conversations",
    ];

    /// The model, system prompt and upstream for `conversation`: its own, else the bot's,
    /// else None.
    pub fn overrides(&self, conversation: Option<&str>) -> Overrides<'_> {
        let own = conversation.and_then(|c| self.conversations.iter().find(|o| o.id == c));
        Overrides {
            model: own
                .and_then(|o| o.model.as_deref())
                .or(self.model.as_deref()),
            system_prompt: own
                .and_then(|o| o.system_prompt.as_deref())
                .or(self.system_prompt.as_deref()),
            upstream: own
                .and_then(|o| o.upstream.as_deref())
                .or(self.upstream.as_deref()),
        }
    }

    /// Whether `user` writing in `conversation` (a group chat when `group`) is answered.
    pub fn allows(&self, user: &str, conversation: &str, group: bool) -> bool {
        let listed = |list: &[String], id: &str| list.iter().any(|x| x == id);
        (if group { self.groups } else { self.dm })
            && !listed(&self.deny_users, user)
            && !listed(&self.deny_conversations, conversation)
            && (self.allow_users.is_empty() || listed(&self.allow_users, user))
            && (self.allow_conversations.is_empty()
                || listed(&self.allow_conversations, conversation))
    }

    /// Whether `user` is one of the bot's admins.
    pub fn is_admin(&self, user: &str) -> bool {
        self.admin_users.iter().any(|x| x == user)
    }
}

/// `[[bots]]`: each table's [`BotPolicy`] keys are taken out and read first, the rest is the
/// platform's settings, so both keep refusing unknown keys.
fn bots_with_policy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<BotSettings>, D::Error> {
    use serde::de::Error;
    let tables = Vec::<toml::Table>::deserialize(d)?;
    tables
        .into_iter()
        .enumerate()
        .map(|(i, mut table)| {
            let fail = |e: toml::de::Error| D::Error::custom(format!("bots[{i}]: {}", e.message()));
            let mut access = toml::Table::new();
            for key in BotPolicy::KEYS {
                if let Some(v) = table.remove(key) {
                    access.insert(key.to_string(), v);
                }
            }
            let access: BotPolicy = toml::Value::Table(access).try_into().map_err(fail)?;
            let mut bot: BotSettings = toml::Value::Table(table).try_into().map_err(fail)?;
            *bot.policy_mut() = access;
            Ok(bot)
        })
        .collect()
}

/// A DingTalk robot of an enterprise-internal app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DingTalkBot {
    /// Route id: callbacks arrive at `POST /dingtalk/{id}`.
    pub id: String,
    /// Who may use the bot (the `[[bots]]` keys of [`BotPolicy`], common to every platform).
    #[serde(skip)]
    pub policy: BotPolicy,
    /// The app's AppKey (Client ID); also the robotCode for OpenAPI sends.
    pub app_key: String,
    /// The app's AppSecret (Client Secret): signs callbacks and fetches tokens.
    pub app_secret: Secret,
    /// OpenAPI base. Default `https://api.dingtalk.com`.
    #[serde(default = "default_dingtalk_api")]
    pub api_base: String,
    /// Robot code if it differs from the app key.
    #[serde(default)]
    pub robot_code: Option<String>,
    /// How answers go out: `"message"` (default) or `"card"`, an AI card streaming the
    /// answer as it is written.
    #[serde(default)]
    pub reply_mode: ReplyMode,
    /// The AI card template. Default the SDK's markdown AI card,
    /// `382e4302-551d-4880-bf29-a30acfab2e71.schema`.
    #[serde(default = "default_card_template")]
    pub card_template_id: String,
    /// The template variable the answer streams into. Default `msgContent`.
    #[serde(default = "default_card_content_key")]
    pub card_content_key: String,
    /// Least time between two updates of one card, ms. Default 500.
    #[serde(default = "default_card_interval")]
    pub card_update_interval_ms: u64,
    /// Calls per second to each OpenAPI endpoint of this app, across the cluster. Default 20,
    /// the standard edition's limit; 0 = not paced.
    #[serde(default = "default_api_qps")]
    pub api_qps: u32,
    /// Metered OpenAPI calls per calendar month (Asia/Shanghai) across the cluster; 0
    /// (default) = unlimited. When what is left cannot cover a card, the answer is a message.
    #[serde(default)]
    pub api_monthly_budget: u64,
    /// Seconds after which a chatter still waiting for a message answer is told it is being
    /// worked on; 0 (default) = never.
    #[serde(default)]
    pub working_notice_secs: u64,
    /// How messages reach Parley: `"http"` (default), DingTalk POSTing each callback to
    /// `/dingtalk/{id}`, or `"stream"`, Parley dialling out to DingTalk's Stream gateway
    /// (no public address needed; the HTTP route of the bot is then off).
    #[serde(default)]
    pub ingress: DingTalkIngress,
    /// Hosts besides DingTalk's (`*.dingtalk.com`, over HTTPS) and `api_base`'s origin that a
    /// callback's `sessionWebhook` may point at; a webhook elsewhere is not used (the answer
    /// goes through the OpenAPI), so a forged callback cannot send it to another host.
    #[serde(default)]
    pub session_webhook_hosts: Vec<String>,
}

/// How a DingTalk bot's messages arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DingTalkIngress {
    /// HTTP callbacks to the public listener.
    #[default]
    Http,
    /// A WebSocket Parley opens to DingTalk's Stream gateway.
    Stream,
}

/// How a DingTalk bot's answers go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyMode {
    /// One or more messages once the answer is complete.
    #[default]
    Message,
    /// An AI card showing the answer as it is written.
    Card,
}

fn default_card_template() -> String {
    "382e4302-551d-4880-bf29-a30acfab2e71.schema".into()
}
fn default_card_content_key() -> String {
    "msgContent".into()
}
fn default_card_interval() -> u64 {
    500
}
fn default_api_qps() -> u32 {
    20
}

impl DingTalkBot {
    /// The robotCode OpenAPI sends need.
    pub fn robot_code(&self) -> &str {
        self.robot_code.as_deref().unwrap_or(&self.app_key)
    }
}

/// A WeCom self-built app (自建应用) receiving messages through its callback URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WecomBot {
    /// Route id: callbacks arrive at `GET/POST /wecom/{id}`.
    pub id: String,
    /// Who may use the bot (the `[[bots]]` keys of [`BotPolicy`], common to every platform).
    #[serde(skip)]
    pub policy: BotPolicy,
    /// The company's CorpID (`ww…`); also the receive id inside every encrypted message.
    pub corp_id: String,
    /// The app's Secret, for `gettoken`.
    pub corp_secret: Secret,
    /// The app's AgentId.
    pub agent_id: i64,
    /// The callback Token (signs callbacks).
    pub token: Secret,
    /// The callback EncodingAESKey (43 characters).
    pub encoding_aes_key: Secret,
    /// API base. Default `https://qyapi.weixin.qq.com`.
    #[serde(default = "default_wecom_api")]
    pub api_base: String,
    /// Send markdown answers as WeCom markdown (renders in the WeCom client only). Default false.
    #[serde(default)]
    pub markdown: bool,
    /// Text sent when a member opens the app (`enter_agent`) or subscribes; absent = no reply.
    #[serde(default)]
    pub welcome_text: Option<String>,
    /// Seconds after which a chatter still waiting for the answer is told it is being
    /// worked on; 0 (default) = never.
    #[serde(default)]
    pub working_notice_secs: u64,
    /// `message/send` calls per minute for this enterprise, across the cluster. Default
    /// 2,000. Besides it, at most 30 messages a minute go to one member (WeCom drops more
    /// silently), so the parts of a long answer wait instead.
    #[serde(default = "default_api_per_minute")]
    pub api_per_minute: u32,
}

/// A WeCom AI bot (智能机器人) in API mode, receiving messages at its callback URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WecomAibotBot {
    /// Route id: callbacks arrive at `GET/POST /wecom/{id}`.
    pub id: String,
    /// Who may use the bot (the `[[bots]]` keys of [`BotPolicy`], common to every platform).
    #[serde(skip)]
    pub policy: BotPolicy,
    /// The callback Token (signs callbacks and replies).
    pub token: Secret,
    /// The callback EncodingAESKey (43 characters); the receive id is the empty string.
    pub encoding_aes_key: Secret,
    /// Text answered when a member opens a chat with the bot (`enter_chat`); absent = none.
    #[serde(default)]
    pub welcome_text: Option<String>,
    /// Seconds after the message within which the answer is shown in the stream; later,
    /// it goes to the callback's `response_url`. Default 330, under WeCom's 6 minutes.
    #[serde(default = "default_stream_window")]
    pub stream_window_secs: u64,
    /// Where WeCom's `response_url`s may point: its origin is allowed besides
    /// `https://qyapi.weixin.qq.com`. Default `https://qyapi.weixin.qq.com`.
    #[serde(default = "default_wecom_api")]
    pub api_base: String,
}

fn default_stream_window() -> u64 {
    330
}

fn default_api_per_minute() -> u32 {
    2000
}

fn default_wecom_api() -> String {
    "https://qyapi.weixin.qq.com".into()
}

fn default_dingtalk_api() -> String {
    "https://api.dingtalk.com".into()
}

impl Settings {
    /// Reads, interpolates and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml(&text, |name| std::env::var(name).ok())
    }

    /// Parses TOML text, resolving `${VAR}` with `env`, then validates.
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            ConfigError::new("(syntax)", msg)
        })?;
        interpolate(&mut value, &mut String::new(), &env)?;
        let settings: Settings = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::new(key, e.into_inner().to_string())
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values serde cannot: ranges, URLs, unique bot ids.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let srv = &self.server;
        for (key, secs) in [
            ("server.header_timeout_secs", srv.header_timeout_secs),
            ("server.body_timeout_secs", srv.body_timeout_secs),
            ("server.idle_timeout_secs", srv.idle_timeout_secs),
        ] {
            if secs == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if srv.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if srv.max_connections == 0 || srv.http2_max_streams == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "max_connections and http2_max_streams must be at least 1",
            ));
        }
        if self.queue.path.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "queue.path",
                "must name a directory (default parley-data)",
            ));
        }
        if self.llm.upstreams.is_empty() {
            check_http_url("llm.base_url", &self.llm.base_url)?;
        }
        let proxy_ok = |key: String, p: &Option<Secret>| match p {
            Some(p)
                if !["http://", "https://", "socks5://", "socks5h://"]
                    .iter()
                    .any(|s| p.expose().starts_with(s)) =>
            {
                Err(ConfigError::new(
                    key,
                    "must start with http://, https://, socks5:// or socks5h://",
                ))
            }
            _ => Ok(()),
        };
        proxy_ok("llm.proxy".into(), &self.llm.proxy)?;
        let mut names = HashSet::new();
        for (i, u) in self.llm.upstreams.iter().enumerate() {
            proxy_ok(format!("llm.upstreams[{i}].proxy"), &u.proxy)?;
            check_http_url(&format!("llm.upstreams[{i}].base_url"), &u.base_url)?;
            if u.name.trim().is_empty() || !names.insert(u.name.as_str()) {
                return Err(ConfigError::new(
                    format!("llm.upstreams[{i}].name"),
                    "must be non-empty and differ from the other upstreams' names",
                ));
            }
        }
        if self.llm.model.trim().is_empty() {
            return Err(ConfigError::new("llm.model", "must not be empty"));
        }
        if self.llm.max_concurrency == 0 {
            return Err(ConfigError::new(
                "llm.max_concurrency",
                "must be at least 1",
            ));
        }
        if self.limits.max_wait_secs == 0 {
            return Err(ConfigError::new(
                "limits.max_wait_secs",
                "must be at least 1",
            ));
        }
        if self.limits.quota_reply.trim().is_empty() {
            return Err(ConfigError::new("limits.quota_reply", "must not be empty"));
        }
        if self.llm.timeout_secs == 0 {
            return Err(ConfigError::new("llm.timeout_secs", "must be at least 1"));
        }
        if let Some(t) = self.llm.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ConfigError::new(
                "llm.temperature",
                "must be between 0 and 2",
            ));
        }
        if self.queue.max_attempts == 0 {
            return Err(ConfigError::new("queue.max_attempts", "must be at least 1"));
        }
        let tiers = &self.queue.retry_delays_secs;
        if tiers.is_empty() || tiers[0] == 0 || !tiers.windows(2).all(|w| w[0] < w[1]) {
            return Err(ConfigError::new(
                "queue.retry_delays_secs",
                "must be a non-empty ascending list of positive seconds",
            ));
        }
        if !(1..=MAX_SHARDS).contains(&self.queue.shards) {
            return Err(ConfigError::new(
                "queue.shards",
                format!("must be between 1 and {MAX_SHARDS}"),
            ));
        }
        if self.queue.capacity == 0 {
            return Err(ConfigError::new("queue.capacity", "must be at least 1"));
        }
        if self.history.max_turns == 0 {
            return Err(ConfigError::new("history.max_turns", "must be at least 1"));
        }
        if self.bots.is_empty() && self.channels.is_empty() {
            return Err(ConfigError::new(
                "bots",
                "at least one [[bots]] or [[channels]] entry is needed",
            ));
        }
        self.validate_channels()?;
        let mut seen = HashSet::new();
        for (i, bot) in self.bots.iter().enumerate() {
            let policy = bot.policy();
            if [&policy.model, &policy.system_prompt]
                .iter()
                .any(|v| v.as_deref().is_some_and(|v| v.trim().is_empty()))
            {
                return Err(ConfigError::new(
                    format!("bots[{i}]"),
                    "model and system_prompt must not be empty when set",
                ));
            }
            let upstreams = self.llm.upstream_list();
            let known = |u: &Option<String>| {
                u.as_deref()
                    .is_none_or(|u| upstreams.iter().any(|x| x.name == u))
            };
            if !known(&policy.upstream) || !policy.conversations.iter().all(|c| known(&c.upstream))
            {
                return Err(ConfigError::new(
                    format!("bots[{i}].upstream"),
                    "names no [[llm.upstreams]] entry",
                ));
            }
            let mut conversations = HashSet::new();
            for (j, c) in policy.conversations.iter().enumerate() {
                if c.id.is_empty() || !conversations.insert(c.id.as_str()) {
                    return Err(ConfigError::new(
                        format!("bots[{i}].conversations[{j}].id"),
                        "must be non-empty and not repeat another's",
                    ));
                }
            }
            let id = bot.id();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::new(
                    format!("bots[{i}].id"),
                    "must be non-empty and use only letters, digits, '-' and '_'",
                ));
            }
            if !seen.insert((bot.route(), id.to_string())) {
                return Err(ConfigError::new(
                    format!("bots[{i}].id"),
                    "duplicate bot id",
                ));
            }
            match bot {
                BotSettings::DingTalk(b) => {
                    if b.app_key.is_empty() {
                        return Err(ConfigError::new(
                            format!("bots[{i}].app_key"),
                            "must not be empty",
                        ));
                    }
                    if b.app_secret.is_empty() {
                        return Err(ConfigError::new(
                            format!("bots[{i}].app_secret"),
                            "must not be empty",
                        ));
                    }
                    check_http_url(&format!("bots[{i}].api_base"), &b.api_base)?;
                }
                BotSettings::Wecom(b) => {
                    let key = |k: &str| format!("bots[{i}].{k}");
                    if b.corp_id.is_empty() {
                        return Err(ConfigError::new(key("corp_id"), "must not be empty"));
                    }
                    if b.corp_secret.is_empty() {
                        return Err(ConfigError::new(key("corp_secret"), "must not be empty"));
                    }
                    if b.token.is_empty() {
                        return Err(ConfigError::new(key("token"), "must not be empty"));
                    }
                    crate::platform::wecom::crypto::WecomCrypto::new(
                        b.token.expose(),
                        b.encoding_aes_key.expose(),
                        &b.corp_id,
                    )
                    .map_err(|_| {
                        ConfigError::new(
                            key("encoding_aes_key"),
                            "must be the 43-character EncodingAESKey from the WeCom console",
                        )
                    })?;
                    check_http_url(&key("api_base"), &b.api_base)?;
                }
                BotSettings::WecomAibot(b) => {
                    let key = |k: &str| format!("bots[{i}].{k}");
                    if b.token.is_empty() {
                        return Err(ConfigError::new(key("token"), "must not be empty"));
                    }
                    crate::platform::wecom::crypto::WecomCrypto::new(
                        b.token.expose(),
                        b.encoding_aes_key.expose(),
                        "",
                    )
                    .map_err(|_| {
                        ConfigError::new(
                            key("encoding_aes_key"),
                            "must be the 43-character EncodingAESKey from the WeCom console",
                        )
                    })?;
                    if !(1..=350).contains(&b.stream_window_secs) {
                        return Err(ConfigError::new(
                            key("stream_window_secs"),
                            "must be between 1 and 350 (WeCom stops refreshing after 6 minutes)",
                        ));
                    }
                    check_http_url(&key("api_base"), &b.api_base)?;
                }
            }
        }
        Ok(())
    }

    fn validate_channels(&self) -> Result<(), ConfigError> {
        if self.notify.max_concurrency == 0 {
            return Err(ConfigError::new(
                "notify.max_concurrency",
                "must be at least 1",
            ));
        }
        if self.notify.window_secs == 0 {
            return Err(ConfigError::new("notify.window_secs", "must be at least 1"));
        }
        if let Some(path) = &self.notify.alertmanager_template {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "notify.alertmanager_template",
                    format!("cannot read {path}: {e}"),
                )
            })?;
            crate::notify::alertmanager::check_template(&text)
                .map_err(|e| ConfigError::new("notify.alertmanager_template", e.to_string()))?;
        }
        let mut seen = HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let key = |k: &str| format!("channels[{i}].{k}");
            if c.id.is_empty()
                || !c
                    .id
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return Err(ConfigError::new(
                    key("id"),
                    "must be non-empty and use only letters, digits, '-' and '_'",
                ));
            }
            if !seen.insert(c.id.clone()) {
                return Err(ConfigError::new(key("id"), "duplicate channel id"));
            }
            // The URL carries the robot's token: never echo it in the message.
            match url::Url::parse(c.url.expose()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(ConfigError::new(
                        key("url"),
                        "must be the robot's http(s) webhook URL",
                    ));
                }
            }
            if c.token.expose().len() < 16 {
                return Err(ConfigError::new(
                    key("token"),
                    "must be at least 16 characters",
                ));
            }
            if c.messages_per_minute == 0 {
                return Err(ConfigError::new(
                    key("messages_per_minute"),
                    "must be at least 1",
                ));
            }
            if c.kind == ChannelKind::WecomRobot && (c.secret.is_some() || c.keyword.is_some()) {
                return Err(ConfigError::new(
                    key("secret"),
                    "secret and keyword are DingTalk robot settings; WeCom robots have neither",
                ));
            }
        }
        Ok(())
    }
}

fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(ConfigError::new(key, "must be an http(s) URL")),
        Err(e) => Err(ConfigError::new(key, format!("not a URL ({e})"))),
    }
}

/// Replaces `${VAR}` in every string value, tracking the key path for error messages.
fn interpolate(
    value: &mut toml::Value,
    path: &mut String,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand(s, env).map_err(|p| ConfigError::new(path.clone(), p))?;
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                interpolate(v, path, env)?;
                path.truncate(len);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                interpolate(v, path, env)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${…} reference".to_string())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        let v = env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[llm]
base_url = "http://127.0.0.1:9200/v1"
api_key = "${KEY}"
model = "m"

[[bots]]
id = "main"
platform = "dingtalk"
app_key = "ding123"
app_secret = "${DT_SECRET}"
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-1".into()),
            "DT_SECRET" => Some("s3cret".into()),
            _ => None,
        }
    }

    #[test]
    fn minimal_config_loads_with_defaults_and_env() {
        let s = Settings::from_toml(MINIMAL, env).unwrap();
        assert_eq!(s.llm.api_key.expose(), "sk-1");
        assert_eq!(s.llm.max_concurrency, 64);
        assert_eq!(s.server.body_limit_bytes, 65536);
        let BotSettings::DingTalk(b) = &s.bots[0] else {
            panic!("a DingTalk bot")
        };
        assert_eq!(b.app_secret.expose(), "s3cret");
        assert_eq!(b.api_base, "https://api.dingtalk.com");
        assert_eq!(b.robot_code(), "ding123");
    }

    #[test]
    fn missing_env_var_names_the_key() {
        let only_secret = |n: &str| (n == "DT_SECRET").then(|| "s".to_string());
        let err = Settings::from_toml(MINIMAL, only_secret)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config: llm.api_key:"), "{err}");
        assert!(err.contains("KEY is not set"), "{err}");
    }

    #[test]
    fn missing_field_names_the_key() {
        let text = MINIMAL.replace("app_key = \"ding123\"\n", "");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.contains("bots[0]") && err.contains("app_key"), "{err}");
    }

    #[test]
    fn bots_take_access_keys_and_still_refuse_unknown_ones() {
        let text = MINIMAL.replace(
            "app_secret = \"${DT_SECRET}\"",
            "app_secret = \"${DT_SECRET}\"\ngroups = false\nallow_users = [\"u1\"]",
        );
        let s = Settings::from_toml(&text, env).unwrap();
        let a = s.bots[0].policy();
        assert!(a.dm && !a.groups);
        assert!(a.allows("u1", "cid", false));
        assert!(!a.allows("u2", "cid", false), "not on the allow list");
        assert!(!a.allows("u1", "cid", true), "groups = false");
        let text = MINIMAL.replace(
            "platform = \"dingtalk\"",
            "platform = \"dingtalk\"\ngrups = false",
        );
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.contains("bots[0]") && err.contains("grups"), "{err}");
        let text = MINIMAL.replace(
            "platform = \"dingtalk\"",
            "platform = \"dingtalk\"\ndm = \"yes\"",
        );
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.contains("bots[0]"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let text = MINIMAL.replace("model = \"m\"", "model = \"m\"\nmax_concurrency = 0");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: llm.max_concurrency:"), "{err}");
        let text = MINIMAL.replace("model = \"m\"", "model = \"m\"\nproxy = \"ftp://proxy:21\"");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: llm.proxy:"), "{err}");
        let up = |name: &str, url: &str| {
            format!("\n[[llm.upstreams]]\nname = \"{name}\"\nbase_url = \"{url}\"\n")
        };
        let two = format!("{}{}", up("a", "http://x/v1"), up("a", "http://y/v1"));
        let text = MINIMAL.replace("model = \"m\"\n", &format!("model = \"m\"\n{two}"));
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: llm.upstreams[1].name:"), "{err}");
        let bad = up("a", "ftp://x");
        let text = MINIMAL.replace("model = \"m\"\n", &format!("model = \"m\"\n{bad}"));
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(
            err.starts_with("config: llm.upstreams[0].base_url:"),
            "{err}"
        );
        let text = MINIMAL.replace(
            "platform = \"dingtalk\"",
            "platform = \"dingtalk\"\nupstream = \"nope\"",
        );
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: bots[0].upstream:"), "{err}");
        let text = format!("{MINIMAL}\n[limits]\nmax_wait_secs = 0\n");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: limits.max_wait_secs:"), "{err}");
        let text = MINIMAL.replace("http://127.0.0.1:9200/v1", "ftp://x");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.starts_with("config: llm.base_url:"), "{err}");
        let text = MINIMAL.replace("[llm]", "[server]\nlisten = \"nope\"\n[llm]");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
    }

    #[test]
    fn queue_shards_default_to_8_and_must_be_1_to_256() {
        assert_eq!(Settings::from_toml(MINIMAL, env).unwrap().queue.shards, 8);
        let with = |n: &str| format!("{MINIMAL}\n[queue]\nshards = {n}\n");
        assert_eq!(
            Settings::from_toml(&with("256"), env).unwrap().queue.shards,
            256
        );
        for bad in ["0", "257"] {
            let err = Settings::from_toml(&with(bad), env)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("config: queue.shards:"), "{bad}: {err}");
        }
    }

    #[test]
    fn shutdown_grace_defaults_to_30_seconds_and_can_be_set() {
        let s = Settings::from_toml(MINIMAL, env).unwrap();
        assert_eq!(s.server.shutdown_grace_secs, 30);
        let set = format!("{MINIMAL}\n[server]\nshutdown_grace_secs = 90\n");
        let s = Settings::from_toml(&set, env).unwrap();
        assert_eq!(s.server.shutdown_grace_secs, 90);
    }

    #[test]
    fn wecom_bot_loads_and_a_bad_aes_key_names_the_key() {
        let wecom = r#"
[[bots]]
id = "wx"
platform = "wecom"
corp_id = "ww1436e0e65a779aee"
corp_secret = "cs"
agent_id = 1000002
token = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
encoding_aes_key = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
"#;
        let s = Settings::from_toml(&format!("{MINIMAL}{wecom}"), env).unwrap();
        let BotSettings::Wecom(b) = &s.bots[1] else {
            panic!("a WeCom bot")
        };
        assert_eq!(
            (b.agent_id, b.api_base.as_str()),
            (1000002, "https://qyapi.weixin.qq.com")
        );
        let bad = wecom.replace("6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt", "short");
        let err = Settings::from_toml(&format!("{MINIMAL}{bad}"), env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config: bots[1].encoding_aes_key:"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let text = MINIMAL.replace("model = \"m\"", "model = \"m\"\nmodle = \"x\"");
        let err = Settings::from_toml(&text, env).unwrap_err().to_string();
        assert!(err.contains("modle"), "{err}");
    }

    #[test]
    fn example_config_is_valid() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../parley.example.toml"
        ))
        .unwrap();
        let settings = Settings::from_toml(&text, |name| {
            Some(match name {
                // Tencent's sample EncodingAESKey: the only value with a fixed shape.
                "WECOM_ENCODING_AES_KEY" | "WECOM_AIBOT_ENCODING_AES_KEY" => {
                    "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C".into()
                }
                _ => "x0123456789abcdef0123456789".into(),
            })
        })
        .unwrap();
        assert_eq!(
            settings.bots.len(),
            3,
            "one DingTalk bot, one WeCom app and one WeCom AI bot"
        );
    }

    /// Every key README's configuration tables name is shown in parley.example.toml, set or
    /// commented out, so a newcomer copying the example sees every knob.
    #[test]
    fn example_config_shows_every_documented_key() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let example = std::fs::read_to_string(format!("{root}/parley.example.toml")).unwrap();
        let shown = |key: &str| {
            example.lines().any(|l| {
                let l = l.trim_start_matches(['#', ' ']);
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let mut missing = Vec::new();
        let mut checked = 0;
        for row in readme.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).unwrap_or_default();
            for name in cell.split('`').skip(1).step_by(2) {
                // "[server] listen", "[[bots]] id", or a bare key in a platform's table.
                let key = name.rsplit(' ').next().unwrap_or(name);
                if name.starts_with("parley") || key.contains('/') {
                    continue; // a command row, not a key
                }
                checked += 1;
                if !shown(key) {
                    missing.push(name.to_string());
                }
            }
        }
        assert!(
            checked > 40,
            "README's tables were not found ({checked} keys)"
        );
        assert!(
            missing.is_empty(),
            "not in parley.example.toml: {missing:?}"
        );
    }
}
