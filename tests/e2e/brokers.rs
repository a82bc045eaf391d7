//! Failure and scale scenarios that only exist with RabbitMQ and Redis: worker crashes,
//! broker connections dropped, Redis restarted, poison jobs, several workers sharing one
//! token, graceful shutdown of a worker process.

use crate::helpers::*;
use parley::app::Roles;
use sim::ConversationType;
use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const LONG_WAIT: Duration = Duration::from_secs(40);

fn brokers(roles: Roles) -> Options {
    Options {
        backend: Backend::Brokers,
        roles,
        ..Options::default()
    }
}

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `parley worker` as a child process with `app`'s configuration.
fn worker_process(app: &TestApp) -> (Proc, tempfile::TempPath) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(app.toml().as_bytes()).unwrap();
    let path = file.into_temp_path();
    let child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("--config")
        .arg(&path)
        .arg("worker")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    (Proc(child), path)
}

fn group_spec(app: &TestApp, i: usize, text: &str) -> sim::CallbackSpec {
    app.spec(
        &format!("m-{i}"),
        &format!("cid-{i}"),
        ConversationType::Group,
        text,
    )
}

/// Posts a callback the way the platform does: again and again while it gets 5xx.
async fn deliver(app: &TestApp, body: &serde_json::Value) {
    for _ in 0..200 {
        match app.send_body(body).await.status().as_u16() {
            200 => return,
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("unexpected status {other}"),
        }
    }
    panic!("callback never accepted");
}

#[tokio::test]
async fn worker_killed_with_200_jobs_in_flight_loses_none_and_answers_each_once() {
    let app = TestApp::spawn_opts(Options {
        llm: "max_concurrency = 250".into(),
        ..brokers(Roles::Ingress)
    })
    .await;
    app.llm.set_latency(Duration::from_millis(3000));
    let (first, _cfg1) = worker_process(&app);
    for i in 0..200 {
        assert_eq!(
            app.send(&group_spec(&app, i, "survive")).await.status(),
            200
        );
    }
    // Jobs taken and waiting on the model: now the worker dies without a word.
    wait_until("the model to see 100 requests", || {
        app.llm.request_count() >= 100
    })
    .await;
    let before = app.dingtalk.sent().len();
    assert!(before < 200, "the kill must land with jobs in flight");
    drop(first);
    let (_second, _cfg2) = worker_process(&app);
    let replies = app.dingtalk.wait_for(200, LONG_WAIT).await;
    assert_eq!(replies.len(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_conversation(&app);
    assert_eq!(counts.len(), 200);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
}

#[tokio::test]
async fn sigterm_lets_a_worker_finish_in_flight_jobs_and_returns_the_rest() {
    let app = TestApp::spawn_opts(Options {
        llm: "max_concurrency = 10".into(),
        ..brokers(Roles::Ingress)
    })
    .await;
    app.llm.set_latency(Duration::from_millis(1000));
    let (mut first, _cfg1) = worker_process(&app);
    for i in 0..30 {
        app.send(&group_spec(&app, i, "graceful")).await;
    }
    wait_until("10 jobs in flight", || app.llm.request_count() >= 10).await;
    let status = Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + LONG_WAIT;
    let exit = loop {
        if let Some(status) = first.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "worker did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "worker exit status {exit}");
    let finished = app.dingtalk.sent().len();
    assert!(
        finished >= 10,
        "in-flight jobs were finished before exit: {finished}"
    );
    assert!(finished < 30, "the worker stopped taking jobs: {finished}");
    let (_second, _cfg2) = worker_process(&app);
    assert_eq!(app.dingtalk.wait_for(30, LONG_WAIT).await.len(), 30);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(per_conversation(&app).values().all(|&n| n == 1));
}

#[tokio::test]
async fn eight_cold_workers_fetch_the_token_once_for_200_messages() {
    let app = TestApp::spawn_opts(brokers(Roles::Ingress)).await;
    let mut workers = Vec::new();
    for _ in 0..8 {
        workers.push(app.extra_worker().await);
    }
    for i in 0..200 {
        let mut body = app.body(&group_spec(&app, i, "token"));
        expire_session(&mut body);
        assert_eq!(app.send_body(&body).await.status(), 200);
    }
    let replies = app.dingtalk.wait_for(200, LONG_WAIT).await;
    assert_eq!(
        replies.len(),
        200,
        "model saw {} requests, {} token fetches",
        app.llm.request_count(),
        app.dingtalk.token_fetches()
    );
    assert_eq!(app.dingtalk.token_fetches(), 1);
    // Nine processes sent 200 group sends through one app's 20 QPS: paced together through
    // Redis, none was throttled.
    for (endpoint, stats) in app.dingtalk.endpoint_stats() {
        assert_eq!(stats.throttled, 0, "{endpoint:?} {stats:?}");
        assert!(stats.peak_per_second <= 20, "{endpoint:?} {stats:?}");
    }
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn poison_job_is_dead_lettered_after_max_attempts_the_user_told_and_replay_answers_it() {
    let app = TestApp::spawn_opts(Options {
        queue: "max_attempts = 3\nretry_delays_secs = [1]".into(),
        ..brokers(Roles::Serve)
    })
    .await;
    app.dingtalk.fail_next_sends(3);
    app.send(&app.group("poison-1", "hello")).await;
    let sent = app.dingtalk.wait_for(1, LONG_WAIT).await;
    assert!(sent[0].content.contains("放弃"), "{}", sent[0].content);
    assert_eq!(
        app.llm.request_count(),
        1,
        "the answer is kept across attempts"
    );
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(app.toml().as_bytes()).unwrap();
    let cli = |args: &[&str]| parley_cli(file.path(), args);
    let listed = cli(&["dlq", "list"]);
    assert!(listed.contains("dingtalk:main:poison-1"), "{listed}");
    assert!(listed.contains("1 dead letter(s)"), "{listed}");
    assert!(cli(&["dlq", "replay", "--all"]).contains("replayed 1"));
    let sent = app.dingtalk.wait_for(2, LONG_WAIT).await;
    assert_eq!(sent[1].content, "Echo: hello (turn 1)");
    assert!(cli(&["dlq", "list"]).contains("0 dead letter(s)"));
}

/// A private vhost, so dropping its connections disturbs no other test.
struct Vhost(String);

impl Vhost {
    fn create() -> Self {
        let name = format!("parley-e2e-{:08x}", rand::random::<u32>());
        let ctl = |args: &[&str]| {
            let s = Command::new("rabbitmqctl").args(args).output().unwrap();
            assert!(
                s.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&s.stderr)
            );
        };
        ctl(&["add_vhost", &name]);
        ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self(name)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }

    fn close_connections(&self) {
        let s = Command::new("rabbitmqctl")
            .args(["close_all_connections", "-p", &self.0, "e2e chaos"])
            .output()
            .unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.0])
            .output();
    }
}

/// `parley serve` on RabbitMQ in a vhost of its own, whose connections a test may close.
async fn on_private_vhost() -> (Vhost, TestApp) {
    brokers_ready().await;
    let vhost = Vhost::create();
    let app = TestApp::spawn_opts(Options {
        amqp_url: Some(vhost.url()),
        ..brokers(Roles::Serve)
    })
    .await;
    (vhost, app)
}

#[tokio::test]
async fn rabbitmq_connections_dropped_under_load_lose_nothing_acknowledged() {
    let (vhost, app) = on_private_vhost().await;
    let bodies: Vec<_> = (0..300)
        .map(|i| app.body(&group_spec(&app, i, "chaos")))
        .collect();
    for (i, body) in bodies.iter().enumerate() {
        if i == 150 {
            vhost.close_connections();
        }
        deliver(&app, body).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let replies = app.dingtalk.wait_for(300, LONG_WAIT).await;
    assert_eq!(replies.len(), 300);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = per_conversation(&app);
    assert_eq!(counts.len(), 300);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
    drop(app);
}

/// A Redis of our own, so restarting it disturbs no other test.
struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    fn start_on(port: u16) -> Child {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed")
    }

    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Self::start_on(port);
        let me = Self { port, child };
        me.wait_up().await;
        me
    }

    async fn wait_up(&self) {
        wait_until("redis to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        })
        .await;
    }

    async fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.child = Self::start_on(self.port);
        self.wait_up().await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn jobs_in_flight_when_the_connections_close_are_answered_once_by_two_workers() {
    let (vhost, app) = on_private_vhost().await;
    let _second = app.extra_worker().await;
    app.llm.set_latency(Duration::from_millis(1500));
    for i in 0..40 {
        deliver(&app, &app.body(&group_spec(&app, i, "in flight"))).await;
    }
    wait_until("jobs with the model", || app.llm.request_count() >= 20).await;
    // The broker hands the unacked jobs on at once; their first workers live and answer.
    vhost.close_connections();
    let replies = app.dingtalk.wait_for(40, LONG_WAIT).await;
    assert_eq!(replies.len(), 40);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counts = per_conversation(&app);
    assert_eq!(counts.len(), 40);
    assert!(counts.values().all(|&n| n == 1), "duplicates: {counts:?}");
}

#[tokio::test]
async fn redis_restart_is_survived_without_restarting_parley() {
    let mut redis = PrivateRedis::start().await;
    let app = TestApp::spawn_opts(Options {
        redis_url: format!("redis://127.0.0.1:{}/", redis.port),
        ..brokers(Roles::Serve)
    })
    .await;
    deliver(&app, &app.body(&app.group("rr-1", "before"))).await;
    app.replies(1).await;
    redis.restart().await;
    deliver(&app, &app.body(&app.group("rr-2", "after"))).await;
    let replies = app.dingtalk.wait_for(2, LONG_WAIT).await;
    assert_eq!(replies.len(), 2);
    assert!(
        replies[1].content.starts_with("Echo: after"),
        "{}",
        replies[1].content
    );
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn an_ingress_takes_chat_callbacks_while_redis_is_down() {
    let mut redis = PrivateRedis::start().await;
    let app = TestApp::spawn_opts(Options {
        redis_url: format!("redis://127.0.0.1:{}/", redis.port),
        ..brokers(Roles::Ingress)
    })
    .await;
    redis.child.kill().unwrap();
    redis.child.wait().unwrap();
    // A chat callback needs only the broker: acknowledged, and the ingress stays ready.
    assert_eq!(
        app.send(&app.group("nr-1", "while redis is down"))
            .await
            .status(),
        200
    );
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    // Once Redis is back, a worker answers what the ingress queued meanwhile.
    redis.child = PrivateRedis::start_on(redis.port);
    redis.wait_up().await;
    let worker = app.extra_worker().await;
    let replies = app.dingtalk.wait_for(1, LONG_WAIT).await;
    assert!(
        replies[0].content.starts_with("Echo: while redis is down"),
        "{}",
        replies[0].content
    );
    worker.stop().await;
}

const CONVERSATIONS: usize = 20;

/// Sends messages `turns` of each of [`CONVERSATIONS`] group chats, each conversation's
/// back-to-back (each callback acknowledged before the next is sent); then checks that
/// every conversation got exactly its answers so far, the last ones being
/// "Echo: msg k (turn k)" for k in `turns`, in order: a wrong turn number means the answer
/// was made without the earlier ones in its history.
async fn answer_turns(app: &TestApp, turns: std::ops::RangeInclusive<usize>) {
    for c in 0..CONVERSATIONS {
        for k in turns.clone() {
            let spec = app.spec(
                &format!("ord-{c}-{k}"),
                &format!("cid-ord-{c}"),
                ConversationType::Group,
                &format!("msg {k}"),
            );
            assert_eq!(app.send(&spec).await.status(), 200);
        }
    }
    let total = CONVERSATIONS * turns.end();
    assert_eq!(app.dingtalk.wait_for(total, LONG_WAIT).await.len(), total);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut by = HashMap::<String, Vec<String>>::new();
    for r in app.dingtalk.sent() {
        by.entry(r.conversation_id.unwrap_or_default())
            .or_default()
            .push(r.content);
    }
    assert_eq!(by.len(), CONVERSATIONS, "{by:?}");
    let expected: Vec<String> = turns
        .clone()
        .map(|k| format!("Echo: msg {k} (turn {k})"))
        .collect();
    for c in 0..CONVERSATIONS {
        let got = &by[&format!("cid-ord-{c}")];
        assert_eq!(got.len(), *turns.end(), "cid-ord-{c}: {got:#?}");
        assert_eq!(got[turns.start() - 1..], expected, "cid-ord-{c}: {got:#?}");
    }
}

#[tokio::test]
async fn three_workers_answer_each_conversation_in_order_with_its_history() {
    let app = TestApp::spawn_opts(Options {
        // Eight shards over three workers: each works two or three.
        queue: "shards = 8".into(),
        ..brokers(Roles::Ingress)
    })
    .await;
    app.llm.set_latency(Duration::from_millis(75));
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(app.extra_worker().await);
    }
    // Right after start: the shards are still moving between the workers.
    answer_turns(&app, 1..=5).await;
    // Once the shards are spread over the three workers, the next turns see all of them.
    tokio::time::sleep(2 * shared::queue::amqp::REBALANCE_EVERY + Duration::from_secs(1)).await;
    answer_turns(&app, 6..=10).await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn worker_killed_mid_stream_finishes_the_same_card_and_opens_no_second() {
    let app = TestApp::spawn_opts(Options {
        dingtalk: "reply_mode = \"card\"\ncard_update_interval_ms = 200".into(),
        ..brokers(Roles::Ingress)
    })
    .await;
    // About 4 s of streaming: time to kill the worker in the middle.
    app.llm
        .set_stream_pacing(Duration::from_millis(100), 1, Duration::from_millis(150));
    let (first, _cfg1) = worker_process(&app);
    let spec = group_spec(&app, 1, "a long streaming answer");
    assert_eq!(app.send(&spec).await.status(), 200);
    wait_until("the card to show part of the answer", || {
        app.dingtalk
            .cards()
            .first()
            .is_some_and(|c| c.updates.len() >= 2)
    })
    .await;
    drop(first);
    let shown_before = app.dingtalk.cards()[0].updates.len();
    let (_second, _cfg2) = worker_process(&app);
    let cards = app.dingtalk.wait_for_finished_cards(1, LONG_WAIT).await;
    assert_eq!(cards.len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = app.dingtalk.cards();
    assert_eq!(all.len(), 1, "one card only: {all:?}");
    let card = &all[0];
    assert!(card.finalized && !card.errored);
    assert!(
        card.updates.len() > shown_before,
        "the second worker carried on"
    );
    assert_eq!(
        card.content["msgContent"],
        "Echo: a long streaming answer (turn 1)"
    );
    assert!(app.dingtalk.sent().is_empty(), "no plain message as well");
}
