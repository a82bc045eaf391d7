//! A fake DingTalk Stream gateway that drives whatever client connects to it, to check a
//! real client against the fake (`tests/sdk/stream_sdk.sh` runs it with the official Python
//! SDK). It starts [`FakeDingTalk`] on 127.0.0.1:0 with one app, prints `BASE_URL <url>`,
//! and once a client connects: pushes MESSAGES bot messages and checks their acks (code 200,
//! data `{"response": …}`), pings and checks the answer, sends `disconnect` and waits for the
//! client to come back on a new connection with a new ticket (the Python SDK may sleep 10 s
//! after a close), then pushes one more message and checks it is acked on the new
//! connection. Prints what it sees and exits 0 if every check passed, 1 otherwise.
//!
//! `cargo run -p parley-sim --example stream_gateway -- [APP_KEY APP_SECRET [MESSAGES]]`

use std::time::{Duration, Instant};

use serde_json::Value;
use sim::dingtalk::{CallbackSpec, FakeApp, FakeDingTalk, StreamAck, StreamConnection};

/// How long the client gets to connect the first time.
const FIRST_CONNECT: Duration = Duration::from_secs(60);
/// How long acks and ping answers may take.
const ANSWER: Duration = Duration::from_secs(10);
/// How long the client gets to reconnect after `disconnect`.
const RECONNECT: Duration = Duration::from_secs(30);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let app_key = args.first().map_or("sdk-app", String::as_str).to_owned();
    let app_secret = args.get(1).map_or("sdk-secret", String::as_str).to_owned();
    let messages: usize = args.get(2).map_or(Ok(3), |n| n.parse())?;

    let dt = FakeDingTalk::start(
        "127.0.0.1:0".parse()?,
        vec![FakeApp::new(&app_key, &app_secret)],
    )
    .await?;
    // The line the driving script waits for.
    println!("BASE_URL {}", dt.base_url());
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("gateway: {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures.push(what);
        }
    };

    if !dt
        .wait_for_stream_connections(&app_key, 1, FIRST_CONNECT)
        .await
    {
        println!("gateway: FAIL no client connected within {FIRST_CONNECT:?}");
        std::process::exit(1);
    }
    let first = dt.stream_connections(&app_key).remove(0);
    println!("gateway: connection 1 open: {}", describe(&first));

    // 1. Bot messages, acked with code 200 and `{"response": …}`.
    for i in 1..=messages {
        let spec = CallbackSpec::one_to_one(&app_key, "staff1", &format!("hello {i}"));
        let id = dt.stream_push(&spec);
        println!("gateway: pushed messageId {id} (msgId {})", spec.msg_id);
    }
    let acks = dt.wait_for_stream_acks(messages, ANSWER).await;
    for ack in &acks {
        print_ack(ack);
    }
    check(
        acks.len() == messages,
        format!("{} of {messages} messages acked", acks.len()),
    );
    check(
        acks.iter().all(|a| a.code == 200 && response_ok(&a.data)),
        "every ack has code 200 and data {\"response\": \"OK\"}".to_owned(),
    );
    check(
        dt.stream_pending(&app_key) == 0,
        format!("nothing pending ({})", dt.stream_pending(&app_key)),
    );

    // 2. A ping, answered with the same messageId and data.
    let ids = dt.stream_ping(&app_key);
    let answered = dt.wait_for_stream_ping_answers(ids.len(), ANSWER).await;
    for ping in &answered {
        println!(
            "gateway: ping {} data {} answered={} matches={}",
            ping.message_id, ping.data, ping.answered, ping.answer_matches
        );
    }
    check(
        ids.len() == 1 && answered.len() == 1 && answered[0].answer_matches,
        "ping answered with code 200 and the same data".to_owned(),
    );

    // 3. `disconnect`: the client leaves and comes back with a new ticket.
    let told = dt.stream_disconnect(&app_key);
    let told_at = Instant::now();
    println!("gateway: sent disconnect to {told} connection(s)");
    let deadline = Instant::now() + RECONNECT;
    let conns = loop {
        let conns = dt.stream_connections(&app_key);
        let back = conns.len() >= 2 && conns.last().is_some_and(StreamConnection::is_open);
        if (back && !conns[0].is_open()) || Instant::now() > deadline {
            break conns;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (i, conn) in conns.iter().enumerate() {
        println!("gateway: connection {}: {}", i + 1, describe(conn));
    }
    check(
        conns.len() == 2 && conns[1].is_open(),
        format!(
            "client reconnected after disconnect ({} connections, {:?} after the frame)",
            conns.len(),
            told_at.elapsed()
        ),
    );
    check(
        !conns[0].is_open(),
        format!("old connection closed (by {:?})", conns[0].closed_by),
    );
    check(
        conns.len() == 2 && conns[0].ticket != conns[1].ticket && dt.stream_tickets_issued() == 2,
        format!(
            "new connection used a new ticket ({} tickets issued)",
            dt.stream_tickets_issued()
        ),
    );
    if let (Some(closed), Some(new)) = (conns[0].closed_at_ms, conns.get(1)) {
        println!(
            "gateway: reconnect gap {} ms (old closed → new open)",
            new.opened_at_ms - closed
        );
    }

    // 4. One more message, acked on the new connection.
    let spec = CallbackSpec::one_to_one(&app_key, "staff1", "after reconnect");
    let id = dt.stream_push(&spec);
    println!("gateway: pushed messageId {id} (msgId {})", spec.msg_id);
    let acks = dt.wait_for_stream_acks(messages + 1, ANSWER).await;
    if let Some(ack) = acks.get(messages) {
        print_ack(ack);
    }
    let new_id = conns.get(1).map(|c| c.id.clone()).unwrap_or_default();
    check(
        acks.get(messages)
            .is_some_and(|a| a.message_id == id && a.code == 200 && a.connection_id == new_id),
        "message after reconnect acked with 200 on the new connection".to_owned(),
    );
    check(
        dt.stream_bad_client_frames() == 0 && dt.stream_stray_acks() == 0,
        format!(
            "no bad client frames ({}) or stray acks ({})",
            dt.stream_bad_client_frames(),
            dt.stream_stray_acks()
        ),
    );

    // Let the client print and leave first (the SDK script waits 1 s after its last message),
    // so its log does not end with the server going away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    dt.shutdown();
    if failures.is_empty() {
        println!("gateway: PASS");
        Ok(())
    } else {
        println!("gateway: FAIL ({} checks)", failures.len());
        std::process::exit(1);
    }
}

fn describe(conn: &StreamConnection) -> String {
    format!(
        "id {} subscriptions {:?} opened_at_ms {} closed_at_ms {:?} closed_by {:?}",
        conn.id, conn.subscriptions, conn.opened_at_ms, conn.closed_at_ms, conn.closed_by
    )
}

fn print_ack(ack: &StreamAck) {
    println!(
        "gateway: ack messageId {} code {} message {:?} data {} latency {:?} on {}",
        ack.message_id, ack.code, ack.message, ack.data, ack.latency, ack.connection_id
    );
}

/// `data` is the SDK's `json.dumps({"response": "OK"})`.
fn response_ok(data: &str) -> bool {
    serde_json::from_str::<Value>(data).is_ok_and(|v| v["response"] == "OK")
}
