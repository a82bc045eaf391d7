//! Engine tests over the embedded queue and cache with a recording messenger.

use super::*;
use async_trait::async_trait;
use shared::cache::{Cache, MemoryCache};
use shared::job::Platform;
use shared::job::{Content, JOB_VERSION, Job, ReplyTarget, RobotTarget, Sender};
use shared::platform::{Messenger, OutgoingMessage, SendError};
use shared::queue::{JobQueue, MemoryQueue};
use shared::split::Limit;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Records what it sends and logs a line per part, as the platform messengers do.
#[derive(Debug, Default)]
struct Recording {
    sent: Mutex<Vec<OutgoingMessage>>,
}

#[async_trait]
impl Messenger for Recording {
    fn limit(&self, _markdown: bool) -> Limit {
        Limit::Chars(10)
    }

    async fn send(&self, _job: &Job, message: &OutgoingMessage) -> Result<(), SendError> {
        tracing::info!("messenger sent a part");
        self.sent.lock().unwrap().push(message.clone());
        Ok(())
    }
}

fn notice(id: &str, text: &str) -> Job {
    Job {
        v: JOB_VERSION,
        id: id.into(),
        bot_id: "ops".into(),
        platform: Platform::DingTalkRobot,
        received_at_ms: 1,
        conversation_key: "robot:ops".into(),
        sender: Sender {
            id: "caller".into(),
            nick: None,
        },
        content: Content::Notice {
            text: text.into(),
            markdown: false,
            title: None,
        },
        reply: ReplyTarget::Robot(RobotTarget::default()),
        trace_id: None,
    }
}

fn notify_engine(queue: Arc<dyn JobQueue>, cache: Arc<dyn Cache>) -> (Engine, Arc<Recording>) {
    let robot = Arc::new(Recording::default());
    let mut messengers = Messengers::new();
    messengers.insert(
        (Platform::DingTalkRobot, "ops".into()),
        robot.clone() as Arc<dyn Messenger>,
    );
    let settings = EngineSettings {
        lane: "notify",
        max_concurrency: 2,
        max_attempts: 3,
        retry_delays_secs: vec![5],
    };
    let engine = Engine::new(settings, queue, cache, Arc::new(NoticeHandler), messengers);
    (engine, robot)
}

/// Collects formatted log output for a test's own subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_messengers_log_line_carries_the_job() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(move || writer.clone())
        .finish();
    // Thread-local, and the current-thread runtime runs the engine's tasks on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let queue = MemoryQueue::new(4, "notify");
    let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
    let (engine, robot) = notify_engine(Arc::new(queue.clone()), cache);
    let mut job = notice("n-42", "disk almost full");
    job.trace_id = Some("5eed5eed5eed5eed".into());
    queue.publish(&job).await.unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(engine.run_until_stopped(stop.clone(), Duration::from_secs(5)));
    for _ in 0..200 {
        if !robot.sent.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    running.await.unwrap();
    let logged = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("messenger sent a part"))
        .unwrap_or_else(|| panic!("no messenger line in {logged}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let span = &v["span"];
    assert_eq!(span["name"], "job", "{line}");
    assert_eq!(span["job"], "n-42", "{line}");
    assert_eq!(span["bot"], "ops", "{line}");
    assert_eq!(span["platform"], "dingtalk_robot", "{line}");
    assert_eq!(span["lane"], "notify", "{line}");
    assert_eq!(span["attempt"], 1, "{line}");
    // The ingress's trace id, so this line joins the ingress's lines of the same request.
    assert_eq!(span["trace"], "5eed5eed5eed5eed", "{line}");
}

#[tokio::test]
async fn a_notice_is_split_by_the_engine_and_resumes_after_its_last_sent_part() {
    let queue = MemoryQueue::new(4, "notify");
    let cache: Arc<dyn Cache> = Arc::new(MemoryCache::new());
    let (engine, robot) = notify_engine(Arc::new(queue), cache.clone());
    let job = notice("n-1", "aaaaaaaaa\nbbbbbbbbb\nccccccccc\nddddddddd");
    // An earlier attempt made the answer and sent its first part.
    let answer = NoticeHandler.answer(&job, None).await.unwrap();
    let saved = serde_json::to_string(&answer).unwrap();
    cache
        .set("answer:n-1", &saved, Duration::from_secs(60))
        .await
        .unwrap();
    cache
        .set("progress:n-1", "1", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(engine.process_job(&job).await, Outcome::Answered);
    let sent: Vec<String> = robot
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.text.clone())
        .collect();
    let all = deliver_answer(&job, robot.as_ref(), &answer).await.unwrap();
    assert!(all > 1, "split to the messenger's limit");
    assert_eq!(
        sent.len(),
        all - 1,
        "the first part is not sent again: {sent:?}"
    );
    assert_eq!(engine.process_job(&job).await, Outcome::Duplicate);
}
