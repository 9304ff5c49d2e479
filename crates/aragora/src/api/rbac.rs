//! `/api/security/rbac/*` and `/api/admin/roles`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::approvals::accepted;
use super::views::{CacheClearedView, CacheWarmupView};
use super::{ApiResult, JsonBody, QueryParams, blocking};
use crate::app::AppState;
use crate::approvals::OperationParams;
use crate::approvals::gate::{Gate, gate, is_privileged};
use crate::approvals::params::CustomRoleParams;
use crate::auth::{Principal, RequestMeta};
use crate::rbac::{denials, permission_catalogue};

pub async fn permissions() -> Response {
    axum::Json(permission_catalogue()).into_response()
}

pub async fn roles(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.rbac.roles()).into_response()
}

pub async fn cache_stats(State(state): State<Arc<AppState>>) -> Response {
    let mut stats = state.rbac.stats();
    if state.cluster.enabled() {
        stats.invalidation = "store-generation".into();
    }
    stats.redis = state.auth.redis_status();
    axum::Json(stats).into_response()
}

pub async fn cache_clear(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
) -> ApiResult<Response> {
    let cleared = blocking(move || {
        let n = state.rbac.clear();
        state.audit.record(
            crate::audit::AuditEvent::new(
                "rbac_cache_cleared",
                p.user_id.clone(),
                crate::audit::Outcome::Success,
            )
            .ip(meta.ip_string())
            .details(serde_json::json!({"entries": n})),
        )?;
        Ok(n)
    })
    .await?;
    Ok(axum::Json(CacheClearedView { cleared }).into_response())
}

pub async fn cache_warmup(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let (users, warmed) = blocking(move || {
        let users = state.auth.all_user_roles()?;
        let warmed = state.rbac.warmup(
            users
                .iter()
                .map(|(id, roles)| (id.as_str(), roles.as_slice())),
        );
        Ok((users.len(), warmed))
    })
    .await?;
    Ok(axum::Json(CacheWarmupView { users, warmed }).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DenialsQuery {
    /// The window in minutes: clamped to 1 to 10080 (a week), default 15.
    minutes: Option<u64>,
}

/// Denials of the last `minutes` from the audit log, one row per (user,
/// permission, role) with its count, most frequent first.
pub async fn denials_recent(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<DenialsQuery>,
) -> ApiResult<Response> {
    let minutes = q.minutes.unwrap_or(15).clamp(1, 7 * 24 * 60);
    let rows = blocking(move || Ok(denials::recent(&state.audit, minutes)?)).await?;
    Ok(axum::Json(rows).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomRoleBody {
    name: String,
    #[serde(default)]
    description: String,
    permissions: Vec<String>,
    /// Why (shown to approvers when the role is privileged and waits for
    /// approval).
    reason: Option<String>,
}

/// A custom role with a sensitive permission is gated (`custom_role_change`):
/// 202 and an approval request unless the caller is an admin.
pub async fn put_role(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<CustomRoleBody>,
) -> ApiResult<Response> {
    blocking(move || {
        // Widening to or narrowing from a sensitive permission both wait.
        let existing = state.rbac.role_grants(&b.name).unwrap_or_default();
        if is_privileged(&b.permissions) || is_privileged(&existing) {
            let reason = b
                .reason
                .clone()
                .unwrap_or_else(|| format!("define the custom role {}", b.name));
            let params = OperationParams::CustomRoleChange(CustomRoleParams {
                name: b.name.clone(),
                permissions: b.permissions.clone(),
                description: b.description.clone(),
            });
            if let Gate::Requested(r) = gate(&state, &p, &meta, &params, &reason)? {
                return Ok(accepted(&r));
            }
        }
        let role = state
            .auth
            .put_role(&p, &b.name, &b.description, b.permissions, &meta)?;
        Ok((StatusCode::CREATED, axum::Json(role)).into_response())
    })
    .await
}

pub async fn delete_role(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    blocking(move || state.auth.delete_role(&p, &name, &meta)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
