//! `/api/security/encryption/*` (key ring health, stats, keys, rotation) and
//! `/api/secrets/*` (the secrets the encryption protects).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiResult, JsonBody, QueryParams, blocking};
use crate::app::AppState;
use crate::auth::{Principal, RequestMeta};

/// Anonymous: nothing secret in it.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.keyring.health()).into_response()
}

pub async fn stats(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.keyring.stats()).into_response()
}

pub async fn keys(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.keyring.keys()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    reason: String,
    #[serde(default)]
    force: bool,
}

pub async fn rotate(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<RotateBody>,
) -> ApiResult<Response> {
    let outcome = blocking(move || {
        Ok(state
            .keyring
            .rotate(&p.user_id, meta.ip_string(), &b.reason, b.force)?)
    })
    .await?;
    Ok(axum::Json(outcome).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSecretBody {
    value: String,
    secret_type: String,
    owner: Option<String>,
}

impl std::fmt::Debug for PutSecretBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutSecretBody")
            .field("value", &"<redacted>")
            .field("secret_type", &self.secret_type)
            .field("owner", &self.owner)
            .finish()
    }
}

pub async fn put_secret(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PutSecretBody>,
) -> ApiResult<Response> {
    let (view, created) = blocking(move || {
        state
            .secrets
            .put(&p, &id, &b.value, &b.secret_type, b.owner.as_deref(), &meta)
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(view)).into_response())
}

pub async fn get_secret(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (mut view, value) = blocking(move || state.secrets.get(&p, &id, &meta)).await?;
    view["value"] = json!(value);
    Ok(axum::Json(view).into_response())
}

pub async fn delete_secret(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    blocking(move || state.secrets.delete(&p, &id, &meta)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

pub async fn list_secrets(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Response> {
    let (items, next) = blocking(move || {
        state
            .secrets
            .list(q.after.as_deref(), q.limit.unwrap_or(100))
    })
    .await?;
    Ok(
        axum::Json(json!({"secrets": items, "count": items.len(), "next_after": next}))
            .into_response(),
    )
}
