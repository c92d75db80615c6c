//! Endpoints for operators and orchestrators rather than FHIR clients:
//! `GET /metrics` (Prometheus text format), `GET /health/live` (the process
//! answers) and `GET /health/ready` (the database answers and its schema is
//! this build's). They carry no personal data and need no token; served on
//! `ops_listen` when it is set, else beside the API.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::AppState;

/// Longest a readiness check waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The operator endpoints.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(s.store.pool_use()),
    )
        .into_response()
}

fn health(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/health+json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn live() -> Response {
    health(StatusCode::OK, json!({"status": "pass"}))
}

async fn ready(State(s): State<AppState>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, s.store.readiness()).await {
        Ok(Ok(r)) if r.schema_current() => health(
            StatusCode::OK,
            json!({"status": "pass", "schemaVersion": r.schema_version}),
        ),
        Ok(Ok(r)) => health(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "status": "fail",
                "output": format!(
                    "the database schema is at migration {}, this build's is {}: run `ehrx migrate`",
                    r.schema_version, r.expected_schema_version
                ),
            }),
        ),
        Ok(Err(e)) => {
            tracing::warn!("readiness: database unreachable: {e}");
            health(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "fail", "output": "the database does not answer"}),
            )
        }
        Err(_) => health(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "fail", "output": "the database did not answer in time"}),
        ),
    }
}
