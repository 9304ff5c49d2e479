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

/// An OpenAPI 3.1 document generated from the route table: every path and
/// method, its summary, whether it needs a bearer credential and which
/// permission (`x-permission`).
pub async fn openapi() -> Response {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let params: Vec<_> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| name.trim_start_matches('*'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": r.summary,
            "parameters": params,
            "responses": {"200": {"description": "success"}, "400": {"description": "bad input, named in `error`"}},
        });
        if let Some(p) = r.permission {
            op["security"] = json!([{"bearer": []}]);
            op["x-permission"] = json!(p);
            op["responses"]["401"] =
                json!({"description": "missing or invalid credential (`reason`)"});
            op["responses"]["403"] =
                json!({"description": "the permission named in `permission` is required"});
        } else {
            op["security"] = json!([]);
        }
        // A catch-all segment (`{*id}`: a secret path) is an ordinary parameter there.
        let entry = paths
            .entry(r.path.replace("{*", "{"))
            .or_insert_with(|| json!({}));
        entry[r.method.to_ascii_lowercase()] = op;
    }
    axum::Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "aragora", "version": env!("CARGO_PKG_VERSION")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "JWT access token or API key (ara_...)"}}},
        "paths": paths,
    }))
    .into_response()
}
