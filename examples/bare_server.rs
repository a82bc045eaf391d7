//! Benchmark reference: the ceiling for any ingress on this box — axum answering `{}` at once.

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::post;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned());
    // The body is read (every real ingress must read it to check the signature) but not parsed.
    let app = Router::new().route(
        "/dingtalk/{bot}",
        post(|_body: Bytes| async { ([(CONTENT_TYPE, "application/json")], "{}") }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bare_server listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}
