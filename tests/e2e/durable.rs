//! The embedded queue's data directory: `parley serve` as a child process, killed with
//! SIGKILL or stopped with SIGTERM while it holds jobs, then started again on the same
//! directory. Every callback that got a 2xx is answered exactly once, dead letters and saved
//! answers outlive the crash, and `parley dlq` works on the directory. The in-process app
//! of each test only provides the fakes; the callbacks go to the child.

use crate::helpers::*;
use serde_json::Value;
use sim::ConversationType;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const LONG_WAIT: Duration = Duration::from_secs(60);

/// `parley serve` as a child process on fixed ports and a data directory of its own,
/// killed when dropped.
struct Serve {
    child: Option<Child>,
    config: tempfile::NamedTempFile,
    _data: tempfile::TempDir,
    url: String,
    ready: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Serve {
    /// `app`'s deployment on a fresh data directory, with `server` added to `[server]`.
    fn new(app: &TestApp, server: &str) -> Self {
        let data = tempfile::tempdir().unwrap();
        let (port, admin) = (free_port(), free_port());
        let mut toml = String::new();
        let mut paths = 0;
        for line in app.toml().lines() {
            let line = match line {
                "admin_listen = \"127.0.0.1:0\"" => {
                    format!("admin_listen = \"127.0.0.1:{admin}\"\n{server}")
                }
                "listen = \"127.0.0.1:0\"" => format!("listen = \"127.0.0.1:{port}\""),
                l if l.starts_with("path = ") => {
                    paths += 1;
                    format!("path = {:?}", data.path())
                }
                l => l.to_string(),
            };
            toml.push_str(&line);
            toml.push('\n');
        }
        assert_eq!(paths, 1, "one data directory in:\n{toml}");
        let mut config = tempfile::NamedTempFile::new().unwrap();
        config.write_all(toml.as_bytes()).unwrap();
        Self {
            child: None,
            config,
            _data: data,
            url: format!("http://127.0.0.1:{port}/dingtalk/main"),
            ready: format!("http://127.0.0.1:{admin}/readyz"),
        }
    }

    async fn start(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .arg("--config")
            .arg(self.config.path())
            .arg("serve")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !client
            .get(&self.ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(tokio::time::Instant::now() < deadline, "serve never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: nothing is drained or written any more.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Runs `parley dlq` on the directory (the process must be stopped).
    fn dlq(&self, args: &[&str]) -> String {
        parley_cli(self.config.path(), &[&["dlq"], args].concat())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Posts each callback the way the platform does: again while refused or unreachable,
/// until it gets 200; counts the acknowledged ones in `acked`.
async fn deliver_all(url: String, bodies: Vec<Value>, acked: Arc<AtomicUsize>) {
    let client = reqwest::Client::new();
    for body in bodies {
        let bytes = serde_json::to_vec(&body).unwrap();
        let deadline = tokio::time::Instant::now() + LONG_WAIT;
        loop {
            match sim::send_callback(&client, &url, APP_SECRET, &bytes).await {
                Ok(r) if r.status() == 200 => break,
                Ok(r) => assert!(
                    r.status().is_server_error(),
                    "refused for good: {}",
                    r.status()
                ),
                Err(_) => {}
            }
            assert!(tokio::time::Instant::now() < deadline, "never acknowledged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        acked.fetch_add(1, Ordering::SeqCst);
    }
}

fn bodies(app: &TestApp, tag: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            app.body(&app.spec(
                &format!("{tag}-{i}"),
                &format!("cid-{tag}-{i}"),
                ConversationType::Group,
                "survive",
            ))
        })
        .collect()
}

/// Waits until jobs are with the model and no reply has gone out for a while, so a kill
/// lands on jobs in flight rather than between a reply and its record (a window no
/// process can close: the platform's send API takes no idempotency key).
async fn quiet_with_jobs_in_flight(app: &TestApp) {
    let mut last = (app.dingtalk.sent().len(), tokio::time::Instant::now());
    let deadline = tokio::time::Instant::now() + LONG_WAIT;
    loop {
        let sent = app.dingtalk.sent().len();
        if sent != last.0 {
            last = (sent, tokio::time::Instant::now());
        }
        if last.1.elapsed() >= Duration::from_millis(300) && app.llm.request_count() > sent {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never quiet");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn serve_killed_again_and_again_loses_no_acknowledged_job_and_answers_each_once() {
    const N: usize = 120;
    let app = TestApp::spawn_opts(Options {
        llm: "max_concurrency = 20".into(),
        ..Options::default()
    })
    .await;
    app.llm.set_latency(Duration::from_millis(1500));
    let mut serve = Serve::new(&app, "");
    serve.start().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(deliver_all(
        serve.url.clone(),
        bodies(&app, "k", N),
        acked.clone(),
    ));
    // While callbacks arrive: some are acknowledged, one may be cut between its commit and
    // its 200 (the platform then sends it again).
    wait_until("half the callbacks acknowledged", || {
        acked.load(Ordering::SeqCst) >= N / 2
    })
    .await;
    serve.kill();
    serve.start().await;
    sender.await.unwrap();
    for round in 0..2 {
        quiet_with_jobs_in_flight(&app).await;
        let sent = app.dingtalk.sent().len();
        assert!(sent < N, "round {round}: the kill must land with jobs left");
        serve.kill();
        serve.start().await;
    }
    let replies = app.dingtalk.wait_for(N, LONG_WAIT).await;
    assert_eq!(replies.len(), N);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_conversation(&app);
    assert_eq!(counts.len(), N, "every acknowledged callback answered");
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
    // The platform sends every callback again after the last restart: each was answered,
    // and the directory remembers.
    let asked = app.llm.request_count();
    deliver_all(
        serve.url.clone(),
        bodies(&app, "k", N),
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.dingtalk.sent().len(), N, "no answer repeated");
    assert_eq!(app.llm.request_count(), asked, "no model call repeated");
}

#[tokio::test]
async fn a_dead_letter_and_its_saved_answer_outlive_a_kill_and_replay_from_the_directory() {
    let app = TestApp::spawn_opts(Options {
        queue: "max_attempts = 2\nretry_delays_secs = [1]".into(),
        ..Options::default()
    })
    .await;
    let mut serve = Serve::new(&app, "");
    serve.start().await;
    app.dingtalk.fail_next_sends(2);
    let body = bodies(&app, "poison", 1);
    deliver_all(serve.url.clone(), body, Arc::new(AtomicUsize::new(0))).await;
    let sent = app.dingtalk.wait_for(1, LONG_WAIT).await;
    assert!(sent[0].content.contains("放弃"), "{}", sent[0].content);
    serve.kill();
    let listed = serve.dlq(&["list"]);
    assert!(listed.contains("dingtalk:main:poison-0"), "{listed}");
    assert!(listed.contains("1 dead letter(s)"), "{listed}");
    assert!(serve.dlq(&["replay", "--all"]).contains("replayed 1"));
    assert!(serve.dlq(&["list"]).contains("0 dead letter(s)"));
    serve.start().await;
    let sent = app.dingtalk.wait_for(2, LONG_WAIT).await;
    assert_eq!(sent[1].content, "Echo: survive (turn 1)");
    assert_eq!(
        app.llm.request_count(),
        1,
        "the answer saved before the kill is used"
    );
}

#[tokio::test]
async fn sigterm_ends_within_the_grace_period_and_the_jobs_left_wait_in_the_directory() {
    const N: usize = 30;
    let app = TestApp::spawn_opts(Options {
        llm: "max_concurrency = 5".into(),
        ..Options::default()
    })
    .await;
    app.llm.set_latency(Duration::from_millis(4000));
    let mut serve = Serve::new(&app, "shutdown_grace_secs = 1");
    serve.start().await;
    let acked = Arc::new(AtomicUsize::new(0));
    deliver_all(serve.url.clone(), bodies(&app, "t", N), acked).await;
    wait_until("jobs with the model", || app.llm.request_count() >= 5).await;
    let mut child = serve.child.take().unwrap();
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve did not end within the grace period plus a few seconds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    assert!(app.dingtalk.sent().len() < N, "jobs were left");
    app.llm.set_latency(Duration::from_millis(10));
    serve.start().await;
    assert_eq!(app.dingtalk.wait_for(N, LONG_WAIT).await.len(), N);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = per_conversation(&app);
    assert_eq!(counts.len(), N);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
}
