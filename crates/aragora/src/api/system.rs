//! Anonymous endpoints: liveness, Prometheus metrics, the route table.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ROUTES;
use super::views::{HealthView, RouteEntry, RoutesView, StoreView};
use crate::app::AppState;

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(HealthView {
        status: "ok".into(),
        maintenance_mode: state.maintenance.mode() != crate::maintenance::MaintenanceMode::Off,
        maintenance: state.maintenance.mode().name().into(),
        sealed: state.keyring.sealed().is_some(),
        store: StoreView {
            backend: state.store.backend().to_string(),
        },
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    crate::metrics::scrape::refresh(&state);
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
    axum::Json(RoutesView {
        routes: ROUTES
            .iter()
            .map(|spec| {
                let op = super::gated_operation(spec.method, spec.path);
                RouteEntry {
                    spec: *spec,
                    or_to_request: op.map(|_| "approvals.request"),
                    gated_operation: op,
                }
            })
            .collect(),
    })
    .into_response()
}

/// The OpenAPI 3.1 document (see `api::openapi`).
pub async fn openapi() -> Response {
    axum::Json(super::openapi::document()).into_response()
}
