//! Anonymous endpoints: liveness, Prometheus metrics, the route table.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ROUTES;
use crate::app::AppState;

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "maintenance_mode": state.config.maintenance_mode,
        "store": {"backend": state.store.backend()},
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {e}"),
        )
            .into_response(),
    }
}

pub async fn routes() -> Response {
    axum::Json(json!({"routes": ROUTES})).into_response()
}
