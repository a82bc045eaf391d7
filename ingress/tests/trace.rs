//! The ingress's request span and the job it queues carry the same trace id, so a
//! message's ingress lines and worker lines can be joined.

use axum::body::Body;
use axum::http::Request;
use shared::cache::memory::MemoryCache;
use shared::config::Settings;
use shared::platform::dingtalk::sign;
use shared::queue::JobQueue;
use shared::queue::memory::MemoryQueue;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

const CONFIG: &str = r#"
[llm]
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-test"
model = "m"

[[bots]]
id = "main"
platform = "dingtalk"
app_key = "ding123"
app_secret = "s3cret"
"#;

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_queued_job_carries_the_trace_of_the_request_span() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let settings = Settings::from_toml(CONFIG, |_| None).unwrap();
    let queue = Arc::new(MemoryQueue::new(8, "chat"));
    let state = ingress::IngressState::new(&settings, queue.clone(), Arc::new(MemoryCache::new()));
    let now = shared::now_ms();
    let body = serde_json::json!({
        "msgtype": "text",
        "msgId": "msg-trace-1",
        "conversationType": "1",
        "conversationId": "cid1",
        "senderId": "u1",
        "senderStaffId": "u1",
        "robotCode": "ding123",
        "text": {"content": "hi"},
    });
    let request = Request::post("/dingtalk/main")
        .header("timestamp", now.to_string())
        .header("sign", sign::sign("s3cret", &now.to_string()))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = ingress::router(state).oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);

    let delivery = queue.next().await.unwrap();
    let trace = delivery
        .job
        .trace_id
        .clone()
        .expect("the job carries a trace");
    assert_eq!(trace.len(), 16, "{trace}");
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("msg-trace-1"))
        .unwrap_or_else(|| panic!("no ingress line names the job: {logged}"));
    let line: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["span"]["trace"], trace.as_str(), "{line}");
    assert_eq!(line["span"]["route"], "dingtalk_callback");
}
