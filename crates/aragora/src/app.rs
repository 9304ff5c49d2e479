//! Application state and router assembly.

use std::sync::Arc;

use aedb::{AedbInstance, Secure};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::config::Config;
use crate::metrics::Metrics;

/// Shared by every request handler.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub metrics: Metrics,
    pub store: AedbInstance<Secure>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), maintenance))
        .with_state(state)
}

/// Lockdown: with MAINTENANCE_MODE=true every request gets 503 except liveness,
/// metrics and the admin recovery endpoints.
async fn maintenance(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let exempt = path == "/api/health" || path == "/metrics" || path.starts_with("/api/admin/");
    if state.config.maintenance_mode && !exempt {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "60")],
            axum::Json(json!({"error": "maintenance mode: only health, metrics and admin recovery are served"})),
        )
            .into_response();
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let m = state.store.operational_metrics();
    axum::Json(json!({
        "status": "ok",
        "maintenance_mode": state.config.maintenance_mode,
        "store": {"engine": "aedb", "head_seq": m.head_seq, "durable_seq": m.durable_seq},
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {e}"),
        )
            .into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": format!("no route for {} {}", req.method(), req.uri().path())})),
    )
        .into_response()
}
