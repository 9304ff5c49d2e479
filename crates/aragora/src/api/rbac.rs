//! `/api/security/rbac/*` and `/api/admin/roles`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, JsonBody, QueryParams, blocking};
use crate::app::AppState;
use crate::audit::SearchFilter;
use crate::auth::{Principal, RequestMeta};
use crate::rbac::catalogue::PERMISSIONS;

pub async fn permissions() -> Response {
    axum::Json(
        PERMISSIONS
            .iter()
            .map(
                |p| json!({"name": p.name, "description": p.description, "sensitive": p.sensitive}),
            )
            .collect::<Vec<_>>(),
    )
    .into_response()
}

pub async fn roles(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.rbac.roles()).into_response()
}

pub async fn cache_stats(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.rbac.stats()).into_response()
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
            .details(json!({"entries": n})),
        )?;
        Ok(n)
    })
    .await?;
    Ok(axum::Json(json!({"cleared": cleared})).into_response())
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
    Ok(axum::Json(json!({"users": users, "warmed": warmed})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenialsQuery {
    minutes: Option<u64>,
}

/// Denials of the last `minutes` from the audit log, one row per (user,
/// permission, role) with its count, most frequent first.
pub async fn denials_recent(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<DenialsQuery>,
) -> ApiResult<Response> {
    let minutes = q.minutes.unwrap_or(15).clamp(1, 7 * 24 * 60);
    let result = blocking(move || {
        Ok(state.audit.search(&SearchFilter {
            action: Some("permission_denied".into()),
            minutes: Some(minutes),
            limit: crate::audit::MAX_SEARCH_LIMIT,
            ..SearchFilter::default()
        })?)
    })
    .await?;
    let mut groups: BTreeMap<(String, String, String), Value> = BTreeMap::new();
    for e in &result.entries {
        let permission = e.details["permission"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let role = e.details["role"].as_str().unwrap_or_default().to_string();
        let g = groups
            .entry((e.actor.clone(), permission.clone(), role.clone()))
            .or_insert_with(|| {
                json!({
                    "user_id": e.actor, "permission": permission, "role": role,
                    "sensitive": e.details["sensitive"], "count": 0,
                    "first_seen": e.timestamp, "last_seen": e.timestamp, "ip_addresses": [],
                })
            });
        g["count"] = json!(g["count"].as_u64().unwrap_or(0) + 1);
        g["last_seen"] = json!(e.timestamp);
        if let (Some(ip), Some(ips)) = (&e.ip_address, g["ip_addresses"].as_array_mut())
            && !ips.iter().any(|x| x == ip)
        {
            ips.push(json!(ip));
        }
    }
    let mut rows: Vec<Value> = groups.into_values().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r["count"].as_u64().unwrap_or(0)));
    Ok(axum::Json(rows).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    name: String,
    #[serde(default)]
    description: String,
    permissions: Vec<String>,
}

pub async fn put_role(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<RoleBody>,
) -> ApiResult<Response> {
    let role = blocking(move || {
        state
            .auth
            .put_role(&p, &b.name, &b.description, b.permissions, &meta)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(role)).into_response())
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
