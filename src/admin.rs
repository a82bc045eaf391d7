//! The admin listener: `/healthz` (the process is alive), `/readyz` (it can take and do
//! work: backends reachable and not shutting down) and `/metrics` (Prometheus text). Kept
//! off the public listener so platforms and the internet never see it.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::fmt;
use std::sync::Arc;

/// A readiness check: true when that part can work now.
pub type Check = Arc<dyn Fn() -> bool + Send + Sync>;

/// The named readiness checks of this process.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.checks.iter().map(|(n, _)| *n).collect();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

impl Readiness {
    /// Adds a check.
    pub fn with(mut self, name: &'static str, check: Check) -> Self {
        self.checks.push((name, check));
        self
    }

    /// The names of the checks that fail now.
    pub fn failing(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|(_, c)| !c())
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The admin routes.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> impl IntoResponse {
    let failing = r.failing();
    if failing.is_empty() {
        (StatusCode::OK, "ready".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", failing.join(", ")),
        )
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        shared::metrics::get().render(),
    )
}
