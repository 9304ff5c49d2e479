//! `/api/admin/*`: users, roles, sessions, lockouts and IP blocks.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::approvals::accepted;
use super::auth::{KeyBody, created_key};
use super::views::{
    BlocksView, RevokedKeysView, RevokedSessionsView, UserPermissionsView, UserSessionsView,
};
use super::{ApiResult, JsonBody, QueryParams, blocking, hashing, optional_body};
use crate::app::AppState;
use crate::approvals::OperationParams;
use crate::approvals::gate::{Gate, gate, is_privileged};
use crate::approvals::params::{IpUnblockParams, RoleGrantParams, UserDeleteParams};
use crate::auth::{Principal, RequestMeta};
use crate::clock::now_us;

/// Users returned by one page of `GET /api/admin/users` at most, and by default.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;
/// User ids are `usr_` and hex; anything longer than this is not a cursor.
const MAX_AFTER_LEN: usize = 128;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListUsersQuery {
    /// Only users holding this role.
    role: Option<String>,
    /// The id of the last user of the previous page (from the `Link` header).
    after: Option<String>,
    /// Users per page: 1 to 1000, default 100.
    limit: Option<usize>,
}

#[derive(serde::Serialize)]
struct NextPage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    after: &'a str,
    limit: usize,
}

/// The RFC 8288 `Link` to the page after `last_id`, with the same filter and
/// page size. Query values are URL-encoded, so the caller's `role` cannot break
/// out of the header; the errors are for that input, should encoding ever fail.
fn next_link(role: Option<&str>, last_id: &str, limit: usize) -> ApiResult<HeaderValue> {
    let query = serde_urlencoded::to_string(NextPage {
        role,
        after: last_id,
        limit,
    })
    .map_err(|e| super::bad_request(format!("role: cannot be encoded: {e}")))?;
    HeaderValue::from_str(&format!("</api/admin/users?{query}>; rel=\"next\""))
        .map_err(|e| super::bad_request(format!("role: cannot be encoded: {e}")))
}

/// `GET /api/admin/users?role=&limit=&after=`: a top-level array (the runbook
/// reads `.[].last_active_at`) in id order; a `Link: <...>; rel="next"` header
/// when more users follow, absent on the last page.
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<ListUsersQuery>,
) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(super::bad_request(format!(
            "limit: must be 1 to {MAX_PAGE}"
        )));
    }
    if let Some(after) = q.after.as_deref() {
        let valid = !after.is_empty()
            && after.len() <= MAX_AFTER_LEN
            && after
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(super::bad_request(
                "after: not a user id (the id of the last user of the previous page)",
            ));
        }
    }
    // One more than the page: the service cannot tell a full last page from a
    // page with more behind it, and a Link to an empty page would be a lie.
    let (mut users, _) = state
        .auth
        .list_users(q.role.as_deref(), q.after.as_deref(), limit + 1)?;
    let more = users.len() > limit;
    users.truncate(limit);
    let mut response = axum::Json(users.as_slice()).into_response();
    if let (true, Some(last)) = (more, users.last()) {
        let link = next_link(q.role.as_deref(), &last.id, limit)?;
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserBody {
    email: String,
    password: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

pub async fn create_user(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<CreateUserBody>,
) -> ApiResult<Response> {
    let st = state.clone();
    let user = hashing(&st, move || {
        state
            .auth
            .create_user(&p, &b.email, b.password.as_deref(), b.roles, &meta)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(user.view(now_us(), None))).into_response())
}

pub async fn get_user(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    Ok(axum::Json(state.auth.get_user(&id)?).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignRoleBody {
    role: String,
    /// Why (shown to approvers when the role is privileged and the grant waits
    /// for approval).
    reason: Option<String>,
}

/// Assigning a role that holds a sensitive permission is gated
/// (`privileged_role_grant`): 202 and an approval request unless the caller is
/// an admin. Other roles are assigned at once.
pub async fn add_role(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<AssignRoleBody>,
) -> ApiResult<Response> {
    blocking(move || {
        let privileged = state
            .rbac
            .role_grants(&b.role)
            .is_some_and(|g| is_privileged(&g));
        if privileged {
            let reason = b
                .reason
                .unwrap_or_else(|| format!("grant the role {} to user {id}", b.role));
            let params = OperationParams::PrivilegedRoleGrant(RoleGrantParams {
                user_id: id.clone(),
                role: b.role.clone(),
            });
            if let Gate::Requested(r) = gate(&state, &p, &meta, &params, &reason)? {
                return Ok(accepted(&r));
            }
        }
        let u = state.auth.add_role(&p, &id, &b.role, &meta)?;
        Ok(axum::Json(u.view(now_us(), None)).into_response())
    })
    .await
}

pub async fn remove_role(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path((id, role)): Path<(String, String)>,
) -> ApiResult<Response> {
    let u = blocking(move || state.auth.remove_role(&p, &id, &role, &meta)).await?;
    Ok(axum::Json(u.view(now_us(), None)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    password: String,
}

pub async fn set_password(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<PasswordBody>,
) -> ApiResult<Response> {
    let st = state.clone();
    hashing(&state, move || {
        st.auth.set_password(&p, &id, &b.password, &meta)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    reason: String,
}

pub async fn disable(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ReasonBody>,
) -> ApiResult<Response> {
    let u = blocking(move || state.auth.disable(&p, &id, &b.reason, &meta)).await?;
    Ok(axum::Json(u.view(now_us(), None)).into_response())
}

pub async fn enable(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let u = blocking(move || state.auth.enable(&p, &id, &meta)).await?;
    Ok(axum::Json(u.view(now_us(), None)).into_response())
}

pub async fn unlock(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let u = blocking(move || state.auth.unlock(&p, &id, &meta)).await?;
    Ok(axum::Json(u.view(now_us(), None)).into_response())
}

pub async fn revoke_keys(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let uid = id.clone();
    let ids = blocking(move || state.auth.revoke_api_keys(&p, &id, None, &meta)).await?;
    Ok(axum::Json(RevokedKeysView {
        user_id: uid,
        revoked: ids.len(),
        key_ids: ids,
    })
    .into_response())
}

pub async fn create_key(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<KeyBody>,
) -> ApiResult<Response> {
    let (key, token) = blocking(move || state.auth.create_api_key(&p, &id, &b.name, &meta)).await?;
    Ok(created_key(key, token))
}

pub async fn permissions(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (_, user) = state.auth.user(&id)?;
    let perms = state.rbac.permissions_of(&user.roles);
    let sensitive = perms
        .iter()
        .filter(|p| crate::rbac::catalogue::is_sensitive(p))
        .map(|p| p.to_string())
        .collect();
    Ok(axum::Json(UserPermissionsView {
        user_id: user.id,
        email: user.email,
        roles: user.roles,
        disabled: user.disabled,
        permissions: perms.into_iter().map(str::to_string).collect(),
        sensitive_permissions: sensitive,
    })
    .into_response())
}

pub async fn sessions(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let now = now_us();
    let (user, sessions) = state.auth.sessions_of(&id)?;
    let active = sessions.iter().filter(|s| s.is_active(&user, now)).count();
    let keys = state.auth.api_keys_of(&id)?;
    Ok(axum::Json(UserSessionsView {
        user_id: id,
        active_sessions: active,
        sessions: sessions.iter().map(|s| s.view(&user, now)).collect(),
        api_keys: keys.iter().map(|k| k.view()).collect(),
    })
    .into_response())
}

#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeSessionsBody {
    session_id: Option<String>,
    reason: Option<String>,
}

pub async fn revoke_user_sessions(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    // The body is optional: no body revokes every session of the user.
    let b: RevokeSessionsBody = optional_body(&body)?;
    let uid = id.clone();
    let ids = blocking(move || {
        state.auth.user(&id)?;
        state.auth.revoke_sessions(
            &p,
            &id,
            b.session_id.as_deref(),
            b.reason.as_deref().unwrap_or("revoked by an administrator"),
            &meta,
        )
    })
    .await?;
    Ok(axum::Json(RevokedSessionsView {
        user_id: uid,
        revoked: ids.len(),
        session_ids: ids,
    })
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkLockBody {
    emails: Vec<String>,
    duration: String,
}

pub async fn bulk_lock(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<BulkLockBody>,
) -> ApiResult<Response> {
    let r = blocking(move || state.auth.bulk_lock(&p, &b.emails, &b.duration, &meta)).await?;
    Ok(axum::Json(r).into_response())
}

/// The optional body of a gated call that takes nothing else: why, shown to
/// approvers when the call waits for approval.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OptionalReasonBody {
    reason: Option<String>,
}

/// Gated (`sessions_revoke_all`): the admin's lockdown acts at once; anyone
/// else with `sessions.revoke` or `approvals.request` gets 202.
pub async fn revoke_all(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let b: OptionalReasonBody = optional_body(&body)?;
    blocking(move || {
        let reason = b
            .reason
            .unwrap_or_else(|| "revoke every session (lockdown)".into());
        match gate(
            &state,
            &p,
            &meta,
            &OperationParams::SessionsRevokeAll,
            &reason,
        )? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => Ok(axum::Json(state.auth.revoke_all_sessions(&p, &meta)?).into_response()),
        }
    })
    .await
}

/// Gated (`user_delete`): 202 unless the caller is an admin.
pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let b: OptionalReasonBody = optional_body(&body)?;
    blocking(move || {
        let reason = b.reason.unwrap_or_else(|| format!("delete user {id}"));
        let params = OperationParams::UserDelete(UserDeleteParams {
            user_id: id.clone(),
        });
        match gate(&state, &p, &meta, &params, &reason)? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => Ok(axum::Json(state.auth.delete_user(&p, &id, &meta)?).into_response()),
        }
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockBody {
    ip: String,
    duration: String,
    #[serde(default)]
    reason: String,
}

pub async fn block_ip(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<BlockBody>,
) -> ApiResult<Response> {
    let r = blocking(move || {
        state
            .auth
            .block_ip(&p, &b.ip, &b.duration, &b.reason, &meta)
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(r)).into_response())
}

pub async fn list_blocks(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    Ok(axum::Json(BlocksView {
        blocks: state.auth.list_blocks(),
    })
    .into_response())
}

/// Gated (`ip_unblock`, low risk): 202 unless the caller is an admin; with
/// `APPROVAL_AUTO_APPROVE_LOW=true` the request is approved at once and runs.
pub async fn unblock_ip(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(ip): Path<String>,
) -> ApiResult<Response> {
    blocking(move || {
        let params = OperationParams::IpUnblock(IpUnblockParams { ip: ip.clone() });
        match gate(
            &state,
            &p,
            &meta,
            &params,
            &format!("remove the IP block {ip}"),
        )? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => {
                state.auth.unblock_ip(&p, &ip, &meta)?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
    })
    .await
}

/// Carries a password: Debug never shows it.
impl std::fmt::Debug for PasswordBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordBody { .. }")
    }
}

/// Carries a password: Debug never shows it.
impl std::fmt::Debug for CreateUserBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CreateUserBody { .. }")
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceBody {
    /// `off`, `read-only` or `on`.
    mode: String,
}

/// `POST /api/admin/maintenance {mode}`: the runbook's "freeze writes"
/// without a restart (exempt from both modes itself, so it can undo them).
pub async fn set_maintenance(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<MaintenanceBody>,
) -> ApiResult<Response> {
    let mode = crate::maintenance::MaintenanceMode::parse(&b.mode).map_err(super::ApiError)?;
    let change =
        blocking(move || state.maintenance.set(mode, &p.user_id, meta.ip_string())).await?;
    Ok(axum::Json(change).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdmissionBody {
    /// Admit at most this many commits per second (1 or more).
    #[serde(default)]
    max_commits_per_sec: Option<u32>,
    /// `true`: remove the limit.
    #[serde(default)]
    unlimited: bool,
}

/// `POST /api/admin/admission {max_commits_per_sec | unlimited}`: the aedb
/// runbook's "reduce the admission rate" without a restart (runtime only).
pub async fn set_admission(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<AdmissionBody>,
) -> ApiResult<Response> {
    use crate::admission::Limit;
    let limit = match (b.max_commits_per_sec, b.unlimited) {
        (Some(_), true) => None,
        (Some(n), false) => std::num::NonZeroU32::new(n).map(Limit::PerSec),
        (None, true) => Some(Limit::Unlimited),
        (None, false) => None,
    }
    .ok_or_else(|| {
        super::ApiError(crate::error::ServiceError::BadRequest(
            "give either max_commits_per_sec (1 or more) or unlimited: true".into(),
        ))
    })?;
    let view = blocking(move || {
        crate::admission::set(
            state.store.as_ref(),
            &state.audit,
            limit,
            &p.user_id,
            meta.ip_string(),
        )
    })
    .await?;
    Ok(axum::Json(view).into_response())
}
