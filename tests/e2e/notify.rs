//! Notifications into group robots end to end: `POST /notify/{channel}` → notification lane
//! → robot webhook fakes that check signatures, keywords and the 20-per-window limit
//! exactly as the platforms do (the window shortened on both sides where a test says so).

use crate::helpers::*;
use serde_json::json;
use sim::robots::{FakeRobots, RobotKind, max_in_any_window};
use std::time::Duration;

const TOKEN: &str = "notify-token-0123456789";
const DT_SECRET: &str = "SEC5pxjtwodlhcvylmr2rjdzc399wegfqaw8cnemmwzuk8lmhiaqes1mnggenlnsntl";

struct Notify {
    app: TestApp,
    robots: FakeRobots,
}

async fn spawn(backend: Backend) -> Notify {
    spawn_with(backend, "").await
}

/// Spawns with `notify` TOML (e.g. `[notify]` knobs) put before the channels.
async fn spawn_with(backend: Backend, notify: &str) -> Notify {
    let robots = FakeRobots::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dt_url = robots.add_dingtalk_robot("dt-ops", Some(DT_SECRET), &["告警"]);
    let wx_url = robots.add_wecom_robot("wx-ops-key");
    let plain_url = robots.add_dingtalk_robot("dt-plain", None, &[]);
    let extra = format!(
        r#"
{notify}

[[channels]]
id = "ops"
kind = "dingtalk_robot"
url = "{dt_url}"
secret = "{DT_SECRET}"
keyword = "告警"
token = "{TOKEN}"
at_mobiles = ["13800000000"]

[[channels]]
id = "wx"
kind = "wecom_robot"
url = "{wx_url}"
token = "{TOKEN}"

[[channels]]
id = "busy"
kind = "dingtalk_robot"
url = "{plain_url}"
token = "{TOKEN}"
"#
    );
    let app = TestApp::spawn_opts(Options {
        backend,
        extra,
        ..Options::default()
    })
    .await;
    Notify { app, robots }
}

impl Notify {
    async fn post(&self, channel: &str, token: &str, body: serde_json::Value) -> reqwest::Response {
        self.app
            .client
            .post(format!("http://{}/notify/{channel}", self.app.addr))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

async fn signed_dingtalk_push_carries_keyword_and_mentions(backend: Backend) {
    let n = spawn(backend).await;
    let resp = n
        .post("ops", TOKEN, json!({"text": "磁盘使用率 91%"}))
        .await;
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("notify:ops:"));
    let got = n.robots.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "refused: {:?}", n.robots.refused());
    let m = &got[0];
    assert_eq!(
        (m.kind, m.robot.as_str(), m.msgtype.as_str()),
        (RobotKind::DingTalk, "dt-ops", "text")
    );
    assert!(
        m.content.contains("磁盘使用率 91%") && m.content.contains("告警"),
        "{}",
        m.content
    );
    assert!(m.content.contains("@13800000000"));
    assert_eq!(m.at_mobiles, vec!["13800000000".to_string()]);
    assert_eq!(n.app.llm.request_count(), 0);
}

async fn wecom_push_as_markdown(backend: Backend) {
    let n = spawn(backend).await;
    let body = json!({"markdown": {"title": "Deploy", "text": "## 发布完成\n- 版本 v1.2.3"}});
    assert_eq!(n.post("wx", TOKEN, body).await.status(), 202);
    let got = n.robots.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "refused: {:?}", n.robots.refused());
    assert_eq!(
        (got[0].kind, got[0].msgtype.as_str()),
        (RobotKind::Wecom, "markdown")
    );
    assert!(got[0].content.contains("版本 v1.2.3"));
}

async fn bad_bearer_token_is_401_and_unknown_channel_404(backend: Backend) {
    let n = spawn(backend).await;
    assert_eq!(
        n.post("ops", "wrong-token-wrong-token", json!({"text": "x"}))
            .await
            .status(),
        401
    );
    let unauthenticated = n
        .app
        .client
        .post(format!("http://{}/notify/ops", n.app.addr))
        .json(&json!({"text": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(
        n.post("nope", TOKEN, json!({"text": "x"})).await.status(),
        404
    );
    assert_eq!(
        n.post("ops", TOKEN, json!({"txt": "typo"})).await.status(),
        400
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(n.robots.received().is_empty());
}

fn alertmanager(status: &str) -> serde_json::Value {
    let alert = |name: &str, instance: &str| {
        json!({
            "status": status,
            "labels": {"alertname": name, "severity": "critical", "instance": instance},
            "annotations": {"summary": format!("{name} on {instance}"), "description": "over threshold for 5m"},
            "startsAt": "2026-11-23T10:00:00Z",
            "endsAt": if status == "resolved" { "2026-11-23T10:30:00Z" } else { "0001-01-01T00:00:00Z" },
            "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
            "fingerprint": format!("{name}{instance}")
        })
    };
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"HighCPU\"}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "parley",
        "groupLabels": {"alertname": "HighCPU"},
        "commonLabels": {"alertname": "HighCPU", "severity": "critical"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [alert("HighCPU", "web-1:9100"), alert("HighCPU", "web-2:9100")]
    })
}

async fn alertmanager_firing_and_resolved_are_rendered_as_one_message_each(backend: Backend) {
    let n = spawn(backend).await;
    assert_eq!(
        n.post("ops", TOKEN, alertmanager("firing")).await.status(),
        202
    );
    assert_eq!(
        n.post("ops", TOKEN, alertmanager("resolved"))
            .await
            .status(),
        202
    );
    let got = n.robots.wait_for(2, WAIT).await;
    assert_eq!(got.len(), 2, "refused: {:?}", n.robots.refused());
    let (firing, resolved) = (&got[0], &got[1]);
    assert_eq!(firing.msgtype, "markdown");
    assert!(
        firing.content.to_uppercase().contains("FIRING"),
        "{}",
        firing.content
    );
    assert!(firing.content.contains("web-1:9100") && firing.content.contains("web-2:9100"));
    assert!(firing.content.contains("HighCPU"));
    assert!(firing.title.as_deref().is_some_and(|t| !t.is_empty()));
    assert!(
        resolved.content.to_uppercase().contains("RESOLVED"),
        "{}",
        resolved.content
    );
    assert!(
        firing.content.contains("告警"),
        "keyword added: {}",
        firing.content
    );
}

on_both_backends!(
    signed_dingtalk_push_carries_keyword_and_mentions,
    wecom_push_as_markdown,
    bad_bearer_token_is_401_and_unknown_channel_404,
    alertmanager_firing_and_resolved_are_rendered_as_one_message_each,
);

/// The robots' limit on a 3-second window instead of the platforms' 60 s, on both sides
/// (`[notify] window_secs` and the fakes), so it is proven in seconds: 45 messages to one
/// robot whose limit is 20 a window.
#[tokio::test]
async fn forty_five_messages_to_one_robot_all_arrive_never_more_than_20_a_window() {
    const WINDOW: Duration = Duration::from_secs(3);
    let n = spawn_with(
        Backend::Embedded,
        &format!("[notify]\nwindow_secs = {}", WINDOW.as_secs()),
    )
    .await;
    n.robots.set_window(WINDOW);
    for i in 0..45 {
        let resp = n
            .post("busy", TOKEN, json!({"text": format!("build #{i} passed")}))
            .await;
        assert_eq!(resp.status(), 202);
    }
    let got = n.robots.wait_for(45, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 45, "refused: {:?}", n.robots.refused());
    assert!(
        n.robots.refused().is_empty(),
        "the robot never had to refuse"
    );
    assert!(max_in_any_window(&got, "dt-plain", WINDOW) <= 20);
    let texts: Vec<_> = got.iter().map(|m| m.content.clone()).collect();
    let expected: Vec<_> = (0..45).map(|i| format!("build #{i} passed")).collect();
    assert_eq!(texts, expected, "in the order they were sent");
}

#[tokio::test]
async fn notify_command_sends_one_message_from_the_command_line() {
    let n = spawn(Backend::Embedded).await;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, n.app.toml().as_bytes()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("--config")
        .arg(file.path())
        .args(["notify", "--channel", "ops", "nightly backup done"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = n.robots.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1, "refused: {:?}", n.robots.refused());
    assert!(got[0].content.starts_with("nightly backup done"));
    assert!(got[0].content.contains("告警"));
}

/// A key that is there but unusable is a 400, not ignored (ignoring it would deliver the
/// caller's retries twice); nothing is queued.
#[tokio::test]
async fn malformed_idempotency_key_is_400_and_nothing_is_sent() {
    let n = spawn(Backend::Embedded).await;
    let url = format!("http://{}/notify/wx", n.app.addr);
    let long = "k".repeat(129);
    let cases: Vec<Vec<&[u8]>> = vec![
        vec![b""],
        vec![long.as_bytes()],
        vec![b"has space"],
        vec!["中文".as_bytes()],
        vec![b"a", b"b"],
    ];
    for values in cases {
        let mut req = n.app.client.post(&url).bearer_auth(TOKEN);
        for v in &values {
            req = req.header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let resp = req.json(&json!({"text": "x"})).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{values:?}");
    }
    let ok = n
        .app
        .client
        .post(&url)
        .bearer_auth(TOKEN)
        .header("idempotency-key", "retry-1")
        .json(&json!({"text": "once"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    n.robots.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(n.robots.received().len(), 1);
}
