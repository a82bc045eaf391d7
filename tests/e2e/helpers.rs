//! The test harness: `TestApp::spawn()` starts the fakes and a Parley on port 0 whose
//! configuration points at them. Tests change configuration, never code paths.

use parley::app::{Application, Roles};
use serde_json::Value;
use shared::config::Settings;
use sim::{
    CallbackSpec, ConversationType, FakeAibot, FakeAibotApp, FakeApp, FakeDingTalk, FakeLlm,
    FakeLlmOptions, FakeStack, FakeWecom, FakeWecomApp, SentMessage,
};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) const APP_KEY: &str = "dingtest";
pub(crate) const APP_SECRET: &str = "test-secret-不要泄露";
pub(crate) const API_KEY: &str = "sk-test";
/// Tencent's sample app (its EncodingAESKey has non-zero trailing bits, as real ones may).
pub(crate) const CORP_ID: &str = "ww1436e0e65a779aee";
pub(crate) const AGENT_ID: i64 = 1000002;
pub(crate) const WECOM_TOKEN: &str = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo";
pub(crate) const WECOM_AES_KEY: &str = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt";
pub(crate) const WECOM_SECRET: &str = "wecom-app-secret";
/// The AI bot of the vectors (receive id "").
pub(crate) const AIBOT_TOKEN: &str = "QDG6eK";
pub(crate) const AIBOT_AES_KEY: &str = "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA";
pub(crate) const AIBOT_ID: &str = "AIBOTID";

/// How long a test waits for something that should happen.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Which queue and cache a test app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// In-process queue and cache.
    Embedded,
    /// RabbitMQ and Redis on 127.0.0.1.
    Brokers,
}

pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A prefix unique to this test process, so parallel runs and leftovers never collide.
fn run_id() -> &'static str {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUN.get_or_init(|| format!("{:08x}", rand::random::<u32>()))
}

/// The `[queue]`/`[cache]` tables for `backend`, with fresh prefixes and `queue_extra`
/// keys added to `[queue]`.
pub(crate) fn backend_toml(backend: Backend, queue_extra: &str, redis_url: &str) -> String {
    match backend {
        Backend::Embedded => format!("[queue]\n{queue_extra}\n"),
        Backend::Brokers => {
            let prefix = format!("e2e-{}-{:08x}", run_id(), rand::random::<u32>());
            // Few shards: every quorum queue costs the broker time to declare, and many
            // tests start apps at once.
            let shards = if queue_extra.contains("shards") {
                ""
            } else {
                "shards = 2\n"
            };
            format!(
                "[queue]\nurl = \"{AMQP_URL}\"\nprefix = \"{prefix}\"\n{shards}{queue_extra}\n\n[cache]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n"
            )
        }
    }
}

/// How to spawn a test app; `Default` is the embedded serve path.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) backend: Backend,
    /// Extra TOML lines for `[llm]`.
    pub(crate) llm: String,
    /// Extra TOML lines for `[queue]`.
    pub(crate) queue: String,
    /// Roles of the spawned process.
    pub(crate) roles: Roles,
    /// Redis URL (another server for restart tests).
    pub(crate) redis_url: String,
    /// AMQP URL override (another vhost for connection-drop tests).
    pub(crate) amqp_url: Option<String>,
    /// Extra top-level TOML (e.g. `[[channels]]` tables), appended last.
    pub(crate) extra: String,
    /// Extra TOML lines for the DingTalk bot `main` (e.g. `reply_mode = "card"`).
    pub(crate) dingtalk: String,
    /// Extra TOML lines for the WeCom AI bot `ai` (e.g. `stream_window_secs = 2`).
    pub(crate) aibot: String,
    /// Replacements made in the finished configuration (e.g. a wrong app secret).
    pub(crate) replace: Vec<(String, String)>,
    /// Whether spawning waits for `/readyz` (false for apps meant never to be ready).
    pub(crate) wait_ready: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            llm: String::new(),
            queue: String::new(),
            roles: Roles::Serve,
            redis_url: REDIS_URL.into(),
            amqp_url: None,
            extra: String::new(),
            dingtalk: String::new(),
            aibot: "welcome_text = \"你好，我是 AI 助手\"".into(),
            replace: Vec::new(),
            wait_ready: true,
        }
    }
}

/// Deletes queues left by earlier runs of these tests, once per process, and fails loudly
/// when RabbitMQ or Redis cannot be reached: these tests never skip.
pub(crate) async fn brokers_ready() {
    static READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ must be running on 127.0.0.1:5672 (see .ci/run)");
            let client = redis::Client::open(REDIS_URL).unwrap();
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis must be running on 127.0.0.1:6379 (see .ci/run)");
            let _: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
            let listed = std::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "name",
                    "consumers",
                ])
                .output();
            if let Ok(out) = listed {
                let channel = conn.create_channel().await.unwrap();
                let mine = format!("e2e-{}-", run_id());
                // Only deployments nobody consumes from any more: another test run going on
                // at the same time has consumers on its job queues.
                let listing = String::from_utf8_lossy(&out.stdout).into_owned();
                let rows: Vec<(&str, &str)> = listing
                    .lines()
                    .filter_map(|l| {
                        let mut cols = l.split_whitespace();
                        Some((cols.next()?, cols.next()?))
                    })
                    .filter(|(name, _)| name.starts_with("e2e-") && !name.starts_with(&mine))
                    .collect();
                let prefix = |name: &str| name.split('.').next().unwrap_or(name).to_string();
                let live: std::collections::HashSet<String> = rows
                    .iter()
                    .filter(|(_, consumers)| *consumers != "0")
                    .map(|(name, _)| prefix(name))
                    .collect();
                for (name, _) in rows {
                    if !live.contains(&prefix(name)) {
                        let _ = channel
                            .queue_delete(
                                name.into(),
                                lapin::options::QueueDeleteOptions::default(),
                            )
                            .await;
                    }
                }
            }
            let _ = conn.close(200, "done".into()).await;
        })
        .await;
}

pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) dingtalk: FakeDingTalk,
    pub(crate) wecom: FakeWecom,
    pub(crate) aibot: FakeAibot,
    pub(crate) llm: FakeLlm,
    pub(crate) client: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    toml: String,
    /// Last field: dropped after the app has been told to stop.
    _topology: Option<BrokerTopology>,
    /// The embedded app's data directory, removed with it.
    _data: Option<tempfile::TempDir>,
}

/// What a test deployment declared in RabbitMQ (both lanes); deleted when dropped, so the
/// suite run again and again leaves the broker as it found it (a broker collecting quorum
/// queues runs out of file handles).
struct BrokerTopology {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl BrokerTopology {
    fn of(settings: &Settings, url: &str) -> Self {
        let q = &settings.queue;
        let (mut queues, mut exchanges) = (Vec::new(), Vec::new());
        for prefix in [q.prefix.clone(), format!("{}.notify", q.prefix)] {
            let names =
                shared::queue::amqp::declared_names(&prefix, q.shards, &q.retry_delays_secs);
            queues.extend(names.queues);
            exchanges.extend(names.exchanges);
        }
        Self {
            url: url.to_string(),
            queues,
            exchanges,
        }
    }
}

impl Drop for BrokerTopology {
    fn drop(&mut self) {
        let url = std::mem::take(&mut self.url);
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        // Drop runs inside the test's runtime, which must not be blocked on: a thread of
        // its own with a runtime of its own does the deleting.
        let deleting = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let props = lapin::ConnectionProperties::default();
                let Ok(Ok(conn)) =
                    tokio::time::timeout(WAIT, lapin::Connection::connect(&url, props)).await
                else {
                    eprintln!("could not reach RabbitMQ to delete this test's queues");
                    return;
                };
                for q in &queues {
                    // A failed delete closes the channel: one channel per delete.
                    if let Ok(ch) = conn.create_channel().await {
                        let opts = lapin::options::QueueDeleteOptions::default();
                        let _ = ch.queue_delete(q.as_str().into(), opts).await;
                    }
                }
                for e in &exchanges {
                    if let Ok(ch) = conn.create_channel().await {
                        let opts = lapin::options::ExchangeDeleteOptions::default();
                        let _ = ch.exchange_delete(e.as_str().into(), opts).await;
                    }
                }
                let _ = conn.close(200, "done".into()).await;
            });
        });
        let _ = deleting.join();
    }
}

/// Another in-process role of the deployment; stopped on drop.
pub(crate) struct Running {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap();
    }

    /// Ends the role at once, as a crash would: nothing is drained, sockets just close.
    pub(crate) async fn kill(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

impl TestApp {
    pub(crate) async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, "").await
    }

    /// Spawns on `backend` with `extra_llm` TOML appended to the `[llm]` table.
    pub(crate) async fn spawn_with(backend: Backend, extra_llm: &str) -> Self {
        Self::spawn_opts(Options {
            backend,
            llm: extra_llm.into(),
            ..Options::default()
        })
        .await
    }

    /// Spawns with full options.
    pub(crate) async fn spawn_opts(opts: Options) -> Self {
        if std::env::var_os("PARLEY_TEST_LOG").is_some() {
            parley::telemetry::init(false, "warn");
        }
        let backend = opts.backend;
        let extra_llm = opts.llm.as_str();
        // Tests send bursts far above a real contract; those about the limit set their own.
        let rpm = if extra_llm.contains("requests_per_minute") {
            ""
        } else {
            "requests_per_minute = 60000\n"
        };
        if backend == Backend::Brokers {
            brokers_ready().await;
        }
        let stack = FakeStack::builder()
            .dingtalk_bot_with(
                "main",
                FakeApp::new(APP_KEY, APP_SECRET),
                opts.dingtalk.clone(),
            )
            .wecom_bot(
                "wx",
                FakeWecomApp {
                    corp_id: CORP_ID.into(),
                    corp_secret: WECOM_SECRET.into(),
                    agent_id: AGENT_ID,
                    token: WECOM_TOKEN.into(),
                    encoding_aes_key: WECOM_AES_KEY.into(),
                },
                "markdown = true\nwelcome_text = \"欢迎使用 AI 助手\"",
            )
            .wecom_aibot(
                "ai",
                FakeAibotApp {
                    token: AIBOT_TOKEN.into(),
                    encoding_aes_key: AIBOT_AES_KEY.into(),
                    aibot_id: AIBOT_ID.into(),
                },
                opts.aibot.clone(),
            )
            .llm(FakeLlmOptions {
                api_key: API_KEY.into(),
                ..FakeLlmOptions::default()
            })
            .model(
                "test-model",
                format!(
                    "system_prompt = \"You are a test assistant.\"\nmax_retries = 2\n{rpm}{extra_llm}"
                ),
            )
            .start()
            .await
            .unwrap();
        let (dingtalk, wecom, aibot, llm) = (
            stack.dingtalk.clone().unwrap(),
            stack.wecom.clone().unwrap(),
            stack.aibot.clone().unwrap(),
            stack.llm.clone(),
        );
        // An embedded app gets a data directory of its own, unless the test names one.
        let data = (backend == Backend::Embedded && !opts.queue.contains("path")).then(|| {
            tempfile::Builder::new()
                .prefix("parley-e2e-")
                .tempdir()
                .unwrap()
        });
        let toml = format!(
            r#"
{backends}
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

{fakes}
{extra}
"#,
            extra = opts.extra,
            backends = {
                let queue = match &data {
                    Some(dir) => format!("path = {:?}\n{}", dir.path(), opts.queue),
                    None => opts.queue.clone(),
                };
                let b = backend_toml(backend, &queue, &opts.redis_url);
                match &opts.amqp_url {
                    Some(url) => b.replace(AMQP_URL, url),
                    None => b,
                }
            },
            fakes = stack.config_toml(),
        );
        // `[[llm.upstreams]]` in `opts.llm` name the stack's fake model as {LLM} (its `/v1`
        // base) or {LLM_ROOT} (the server itself, as an Azure resource).
        let root = llm.base_url().trim_end_matches("/v1").to_string();
        let mut toml = toml
            .replace("{LLM}", &llm.base_url())
            .replace("{LLM_ROOT}", &root);
        for (from, to) in &opts.replace {
            assert!(
                toml.contains(from.as_str()),
                "{from:?} is not in the configuration"
            );
            toml = toml.replace(from.as_str(), to);
        }
        let settings = Settings::from_toml(&toml, |_| None).unwrap();
        let topology = (backend == Backend::Brokers)
            .then(|| BrokerTopology::of(&settings, opts.amqp_url.as_deref().unwrap_or(AMQP_URL)));
        let app = Application::build_roles(settings, opts.roles)
            .await
            .unwrap();
        let (addr, admin) = (app.address(), app.admin_address());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let client = reqwest::Client::new();
        let ready = format!("http://{admin}/readyz");
        // Declaring quorum queues is slow when many tests start apps at once.
        let deadline = tokio::time::Instant::now() + 3 * WAIT;
        let mut ready_yet = !opts.wait_ready;
        while !ready_yet {
            ready_yet = client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready_yet {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "app never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            addr,
            admin,
            dingtalk,
            wecom,
            aibot,
            llm,
            client,
            shutdown,
            handle: Some(handle),
            toml,
            _topology: topology,
            _data: data,
        }
    }

    /// This app's configuration, for more processes of the same deployment.
    pub(crate) fn settings(&self) -> Settings {
        Settings::from_toml(&self.toml, |_| None).unwrap()
    }

    /// The configuration as TOML, for child processes.
    pub(crate) fn toml(&self) -> &str {
        &self.toml
    }

    /// Starts one more in-process worker of the same deployment.
    pub(crate) async fn extra_worker(&self) -> Running {
        let app = Application::build_roles(self.settings(), Roles::Worker)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(stop.clone()));
        Running { stop, handle }
    }

    /// Starts one more in-process ingress of the same deployment; returns it and its address.
    pub(crate) async fn extra_ingress(&self) -> (Running, SocketAddr) {
        let app = Application::build_roles(self.settings(), Roles::Ingress)
            .await
            .unwrap();
        let addr = app.address();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(stop.clone()));
        (Running { stop, handle }, addr)
    }

    /// The AI bot's callback URL.
    pub(crate) fn aibot_url(&self) -> String {
        format!("http://{}/wecom/ai", self.addr)
    }

    pub(crate) fn callback_url(&self) -> String {
        format!("http://{}/dingtalk/main", self.addr)
    }

    pub(crate) fn group(&self, msg_id: &str, text: &str) -> CallbackSpec {
        self.spec(msg_id, "cid-group-1==", ConversationType::Group, text)
    }

    pub(crate) fn one_to_one(&self, msg_id: &str, text: &str) -> CallbackSpec {
        self.spec(msg_id, "cid-single-1==", ConversationType::OneToOne, text)
    }

    pub(crate) fn spec(
        &self,
        msg_id: &str,
        conversation: &str,
        kind: ConversationType,
        text: &str,
    ) -> CallbackSpec {
        CallbackSpec {
            msg_id: msg_id.into(),
            conversation_id: conversation.into(),
            conversation_type: kind,
            sender_staff_id: "staff-42".into(),
            sender_nick: "小王".into(),
            text: text.into(),
            robot_code: APP_KEY.into(),
            msgtype: "text".into(),
        }
    }

    pub(crate) fn body(&self, spec: &CallbackSpec) -> Value {
        self.dingtalk.callback_body(spec)
    }

    /// Sends a correctly signed callback.
    pub(crate) async fn send(&self, spec: &CallbackSpec) -> reqwest::Response {
        self.send_body(&self.body(spec)).await
    }

    pub(crate) async fn send_body(&self, body: &Value) -> reqwest::Response {
        let bytes = serde_json::to_vec(body).unwrap();
        sim::send_callback(&self.client, &self.callback_url(), APP_SECRET, &bytes)
            .await
            .unwrap()
    }

    /// Sends `body` with explicit `timestamp` and `sign` headers.
    pub(crate) async fn send_signed_as(
        &self,
        body: Vec<u8>,
        timestamp: &str,
        sign: &str,
    ) -> reqwest::Response {
        self.client
            .post(self.callback_url())
            .header("content-type", "application/json")
            .header("timestamp", timestamp)
            .header("sign", sign)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn replies(&self, n: usize) -> Vec<SentMessage> {
        let got = self.dingtalk.wait_for(n, WAIT).await;
        assert!(
            got.len() >= n,
            "expected {n} replies, got {}: {got:#?}",
            got.len()
        );
        got
    }

    /// Waits a little and asserts nothing more than `n` replies arrived.
    pub(crate) async fn assert_settled_at(&self, n: usize) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = self.dingtalk.sent();
        assert_eq!(got.len(), n, "{got:#?}");
    }

    /// `GET` of an admin endpoint (`/readyz`, `/healthz`, `/metrics`).
    pub(crate) async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.text().await.unwrap()
    }

    pub(crate) fn wecom_url(&self) -> String {
        format!("http://{}/wecom/wx", self.addr)
    }

    /// Sends `xml` (a decrypted WeCom message) encrypted and signed as WeCom would.
    pub(crate) async fn send_wecom(&self, xml: &str) -> reqwest::Response {
        let (query, body) = self.wecom.callback(CORP_ID, xml);
        self.post_wecom(&query, body).await
    }

    pub(crate) async fn post_wecom(&self, query: &str, body: String) -> reqwest::Response {
        self.client
            .post(format!("{}?{query}", self.wecom_url()))
            .header("content-type", "text/xml")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.dingtalk.shutdown();
        self.wecom.shutdown();
        self.aibot.shutdown();
        self.llm.shutdown();
    }
}

/// Marks a callback body's sessionWebhook as expired, forcing the OpenAPI path.
pub(crate) fn expire_session(body: &mut Value) {
    body["sessionWebhookExpiredTime"] = (shared::now_ms() - 1_000).into();
}

/// Replies per conversation on the fake DingTalk, to check "exactly one answer each".
pub(crate) fn per_conversation(app: &TestApp) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for r in app.dingtalk.sent() {
        *counts
            .entry(r.conversation_id.unwrap_or_default())
            .or_default() += 1;
    }
    counts
}

/// Waits up to a minute for `cond`, failing the test with `what` after that.
pub(crate) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the `parley` binary with `--config config` and `args`; its stdout, failing the test
/// when it fails.
pub(crate) fn parley_cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
