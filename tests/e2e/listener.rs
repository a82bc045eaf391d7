//! The public listener against clients that misbehave on purpose: headers never finished,
//! bodies trickling in, oversized heads, idle sockets by the hundred, HTTP/2 — and shutdown
//! with all of them still connected.

use crate::helpers::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[server]` lines added for these tests: short timeouts so they are proven in seconds.
fn with_server(lines: &str) -> Options {
    Options {
        replace: vec![(
            "admin_listen = \"127.0.0.1:0\"".into(),
            format!("admin_listen = \"127.0.0.1:0\"\n{lines}"),
        )],
        ..Options::default()
    }
}

/// Reads until the peer closes or `within` passes; returns what arrived and whether it closed.
async fn read_until_closed(conn: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
        }
    }
}

fn signed_head(content_length: usize) -> String {
    let ts = shared::now_ms().to_string();
    let sign = shared::platform::dingtalk::sign::sign(APP_SECRET, &ts);
    format!(
        "POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: {content_length}\r\n\r\n"
    )
}

#[tokio::test]
async fn half_a_header_is_cut_off_after_the_header_timeout() {
    let app = TestApp::spawn_opts(with_server("header_timeout_secs = 1")).await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(b"POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ntimes")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed, "a half-sent header holds the socket");
    // A connection that sends nothing at all, and a kept-alive one after its request, too.
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    assert!(
        read_until_closed(&mut silent, Duration::from_secs(5))
            .await
            .1
    );
    let mut kept = TcpStream::connect(app.addr).await.unwrap();
    kept.write_all(b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut kept, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(closed, "an idle kept-alive connection is closed");
}

#[tokio::test]
async fn a_trickling_body_gets_408_and_nothing_is_queued() {
    let app = TestApp::spawn_opts(with_server("body_timeout_secs = 1")).await;
    let body = serde_json::to_string(&app.body(&app.group("slow-1", "hi"))).unwrap();
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    conn.write_all(signed_head(body.len()).as_bytes())
        .await
        .unwrap();
    conn.write_all(&body.as_bytes()[..10]).await.unwrap();
    let (answer, _) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    app.assert_settled_at(0).await;
    assert_eq!(app.llm.request_count(), 0);
    assert!(app.metrics().await.contains(r#"outcome="slow_body""#));
}

#[tokio::test]
async fn a_500_kb_header_is_431() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /dingtalk/main HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n",
        "a".repeat(500 * 1024)
    );
    // The server may close before all of it is written.
    let _ = conn.write_all(head.as_bytes()).await;
    let (answer, _) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    assert_eq!(app.send(&app.group("after-431", "hi")).await.status(), 200);
}

#[tokio::test]
async fn at_the_connection_cap_idle_sockets_make_room_for_callbacks() {
    let app = TestApp::spawn_opts(with_server("max_connections = 20")).await;
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(app.addr).await.unwrap());
    }
    for i in 0..5 {
        let resp = app.send(&app.group(&format!("cap-{i}"), "hi")).await;
        assert_eq!(resp.status(), 200);
    }
    app.replies(5).await;
    let m = app.metrics().await;
    assert!(m.contains("parley_connections_shed_total"), "{m}");
}

#[tokio::test]
async fn callbacks_over_http2_prior_knowledge_are_answered() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let body = serde_json::to_vec(&app.body(&app.group("h2-1", "over h2"))).unwrap();
    let resp = sim::send_callback(&h2, &app.callback_url(), APP_SECRET, &body)
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(app.replies(1).await[0].content, "Echo: over h2 (turn 1)");
}

#[tokio::test]
async fn shutdown_ends_with_slow_clients_still_connected_and_loses_no_accepted_job() {
    let app = TestApp::spawn_opts(with_server(
        "shutdown_grace_secs = 2\nheader_timeout_secs = 60\nbody_timeout_secs = 60",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(signed_head(500).as_bytes()).await.unwrap();
    slow.write_all(b"{\"msg").await.unwrap();
    for i in 0..3 {
        assert_eq!(
            app.send(&app.group(&format!("sd-{i}"), "bye"))
                .await
                .status(),
            200
        );
    }
    let dingtalk = app.dingtalk.clone();
    tokio::time::timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("shutdown is bounded whatever clients are connected");
    assert_eq!(
        dingtalk.sent().len(),
        3,
        "every accepted job answered first"
    );
    let (_, closed) = read_until_closed(&mut held[0], Duration::from_secs(2)).await;
    assert!(closed, "connections still open are closed");
}
