//! The test harness: `TestApp::spawn()` starts the fakes and a Parley on port 0 whose
//! configuration points at them. Tests change configuration, never code paths.

use parley::app::Application;
use parley::sim::{
    CallbackSpec, ConversationType, FakeApp, FakeDingTalk, FakeLlm, FakeLlmOptions, FakeWecom,
    FakeWecomApp, SentMessage,
};
use serde_json::Value;
use shared::config::Settings;
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

/// How long a test waits for something that should happen.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

pub(crate) struct TestApp {
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) dingtalk: FakeDingTalk,
    pub(crate) wecom: FakeWecom,
    pub(crate) llm: FakeLlm,
    pub(crate) client: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

impl TestApp {
    pub(crate) async fn spawn() -> Self {
        Self::spawn_with("").await
    }

    /// Spawns with `extra` TOML appended to the `[llm]` table.
    pub(crate) async fn spawn_with(extra_llm: &str) -> Self {
        let dingtalk = FakeDingTalk::start(
            local(),
            vec![FakeApp {
                app_key: APP_KEY.into(),
                app_secret: APP_SECRET.into(),
            }],
        )
        .await
        .unwrap();
        let wecom = FakeWecom::start(
            local(),
            vec![FakeWecomApp {
                corp_id: CORP_ID.into(),
                corp_secret: WECOM_SECRET.into(),
                agent_id: AGENT_ID,
                token: WECOM_TOKEN.into(),
                encoding_aes_key: WECOM_AES_KEY.into(),
            }],
        )
        .await
        .unwrap();
        let llm = FakeLlm::start(
            local(),
            FakeLlmOptions {
                api_key: API_KEY.into(),
                ..FakeLlmOptions::default()
            },
        )
        .await
        .unwrap();
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[llm]
base_url = "{llm}"
api_key = "{API_KEY}"
model = "test-model"
system_prompt = "You are a test assistant."
max_retries = 2
{extra_llm}

[[bots]]
id = "main"
platform = "dingtalk"
app_key = "{APP_KEY}"
app_secret = "{APP_SECRET}"
api_base = "{dt}"

[[bots]]
id = "wx"
platform = "wecom"
corp_id = "{CORP_ID}"
corp_secret = "{WECOM_SECRET}"
agent_id = {AGENT_ID}
token = "{WECOM_TOKEN}"
encoding_aes_key = "{WECOM_AES_KEY}"
api_base = "{wx}"
markdown = true
welcome_text = "欢迎使用 AI 助手"
"#,
            llm = llm.base_url(),
            dt = dingtalk.base_url(),
            wx = wecom.base_url(),
        );
        let settings = Settings::from_toml(&toml, |_| None).unwrap();
        let app = Application::build(settings).await.unwrap();
        let (addr, admin) = (app.address(), app.admin_address());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            addr,
            admin,
            dingtalk,
            wecom,
            llm,
            client: reqwest::Client::new(),
            shutdown,
            handle: Some(handle),
        }
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
        parley::sim::send_callback(&self.client, &self.callback_url(), APP_SECRET, &bytes)
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

    pub(crate) async fn metrics(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
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
        self.llm.shutdown();
    }
}

/// Marks a callback body's sessionWebhook as expired, forcing the OpenAPI path.
pub(crate) fn expire_session(body: &mut Value) {
    body["sessionWebhookExpiredTime"] = (shared::now_ms() - 1_000).into();
}
