//! `/api/security/approvals/*`: request, list, read and decide approval requests.
//!
//! Deciding routes only need an authenticated caller at the guard: whether the
//! caller may decide is the approval service's rule, so every attempt without
//! the authority is audited as `unauthorized_approval` (not a generic
//! `permission_denied`) and counted for the `UnauthorizedApprovalAttempt` alert.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{ApiResult, JsonBody, QueryParams, blocking};
use crate::app::AppState;
use crate::approvals::request::ApprovalRequest;
use crate::approvals::{
    ApproveInput, Decider, Operation, OperationParams, RiskLevel, Status, execute, gate,
};
use crate::auth::{Principal, RequestMeta};
use crate::error::ServiceError;

fn parse<T: std::str::FromStr<Err = String>>(v: Option<&str>) -> Result<Option<T>, ServiceError> {
    v.map(str::parse)
        .transpose()
        .map_err(ServiceError::BadRequest)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    operation: String,
    #[serde(default)]
    params: serde_json::Value,
    reason: String,
}

/// `POST /api/security/approvals`: asks for a gated operation explicitly.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<RequestBody>,
) -> ApiResult<Response> {
    let r = blocking(move || {
        let operation: Operation = b.operation.parse().map_err(ServiceError::BadRequest)?;
        let params =
            OperationParams::parse(operation, &b.params).map_err(ServiceError::BadRequest)?;
        gate::request(&state, &p, &meta, &params, &b.reason)
    })
    .await?;
    Ok(accepted(&r))
}

/// 202 `{approval_id, status, operation, risk_level, expires_at}`: the call
/// waits for approvers (a gated call or an explicit request).
pub fn accepted(r: &ApprovalRequest) -> Response {
    (StatusCode::ACCEPTED, axum::Json(r.created_view())).into_response()
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PendingQuery {
    /// Only requests of this risk level: low, medium, high or critical.
    risk_level: Option<String>,
}

/// `GET /api/security/approvals/pending?risk_level=`: a top-level array, oldest first.
pub async fn pending(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<PendingQuery>,
) -> ApiResult<Response> {
    let risk: Option<RiskLevel> = parse(q.risk_level.as_deref())?;
    let list = blocking(move || Ok(state.approvals.pending(risk)?)).await?;
    Ok(axum::Json(list).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only requests in this status: pending, approved, executing, executed,
    /// failed, refused, rejected or expired.
    status: Option<String>,
    /// Only requests for this gated operation (e.g. migration_run).
    operation: Option<String>,
    /// Only requests older than this approval id (paging backwards).
    before: Option<String>,
    /// Requests at most: clamped to 1 to 1000, default 100.
    limit: Option<usize>,
}

fn parse_status(s: &str) -> Result<Status, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!(
            "status {s:?} is not one of pending, approved, executing, executed, failed, refused, rejected, expired"
        )
    })
}

/// `GET /api/security/approvals`: every request, newest first, filtered.
pub async fn history(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<HistoryQuery>,
) -> ApiResult<Response> {
    let status = q
        .status
        .as_deref()
        .map(parse_status)
        .transpose()
        .map_err(ServiceError::BadRequest)?;
    let operation: Option<Operation> = parse(q.operation.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let list = blocking(move || {
        Ok(state
            .approvals
            .history(q.before.as_deref(), limit, status, operation)?)
    })
    .await?;
    let views: Vec<_> = list.iter().map(ApprovalRequest::view).collect();
    Ok(axum::Json(views).into_response())
}

/// `GET /api/security/approvals/{id}`: any status, with decisions and result.
pub async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let r = blocking(move || Ok(state.approvals.get(&id)?)).await?;
    Ok(axum::Json(r.view()).into_response())
}

/// Runs `f` with the caller as a decider: roles from the token, `disabled` from
/// the store (a disabled account's token stops at the guard already; this
/// closes the window of a request in flight), and whether any role grants
/// `approvals.approve`.
fn as_decider<T>(
    state: &AppState,
    p: &Principal,
    f: impl FnOnce(&Decider<'_>) -> Result<T, ServiceError>,
) -> Result<T, ServiceError> {
    let (_, user) = state.auth.user(&p.user_id)?;
    f(&Decider {
        user_id: &p.user_id,
        roles: &p.roles,
        disabled: user.disabled,
        can_approve: state.rbac.evaluate(&p.roles, "approvals.approve").is_some(),
    })
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    notes: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    checklist_confirmed: Vec<String>,
    #[serde(default)]
    bypass_checklist: bool,
}

#[derive(Debug, Serialize)]
struct DecisionResult {
    approval_id: String,
    status: Status,
    approvals: usize,
    required_approvals: u8,
}

fn decision_result(r: &ApprovalRequest) -> DecisionResult {
    DecisionResult {
        approval_id: r.id.clone(),
        status: r.status,
        approvals: r.approvals().count(),
        required_approvals: r.required_approvals,
    }
}

pub async fn approve(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ApproveBody>,
) -> ApiResult<Response> {
    let runner = state.clone();
    let r = blocking(move || {
        let input = ApproveInput {
            notes: b.notes,
            reason: b.reason,
            checklist_confirmed: b.checklist_confirmed,
            bypass_checklist: b.bypass_checklist,
        };
        as_decider(&state, &p, |d| {
            let (_, r) = state.approvals.approve(&id, d, input, meta.ip_string())?;
            Ok(r)
        })
    })
    .await?;
    if r.status == Status::Approved {
        execute::spawn(&runner, r.id.clone());
    }
    Ok(axum::Json(decision_result(&r)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    reason: Option<String>,
}

pub async fn reject(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<RejectBody>,
) -> ApiResult<Response> {
    let r = blocking(move || {
        as_decider(&state, &p, |d| {
            Ok(state.approvals.reject(&id, d, b.reason, meta.ip_string())?)
        })
    })
    .await?;
    Ok(axum::Json(decision_result(&r)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BypassBody {
    reason: Option<String>,
    incident_id: Option<String>,
}

pub async fn emergency_bypass(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<BypassBody>,
) -> ApiResult<Response> {
    let runner = state.clone();
    let r = blocking(move || {
        as_decider(&state, &p, |d| {
            Ok(state.approvals.emergency_bypass(
                &id,
                d,
                b.reason,
                b.incident_id,
                meta.ip_string(),
            )?)
        })
    })
    .await?;
    if r.status == Status::Approved {
        execute::spawn(&runner, r.id.clone());
    }
    Ok(axum::Json(decision_result(&r)).into_response())
}

#[derive(Debug, Serialize)]
struct EligibleApprover {
    id: String,
    email: String,
    roles: Vec<String>,
    last_active_at: Option<String>,
}

/// `GET /api/security/approvals/{id}/eligible-approvers`: enabled users who
/// hold one of the operation's approver roles and `approvals.approve`, other
/// than the requester.
pub async fn eligible_approvers(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let out = blocking(move || {
        let r = state.approvals.get(&id)?;
        let users = state
            .auth
            .eligible_approvers(r.operation.policy().approver_roles, &r.requester_id)?;
        Ok(users
            .into_iter()
            .map(|u| EligibleApprover {
                id: u.id,
                email: u.email,
                roles: u.roles,
                last_active_at: u.last_active_at,
            })
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(axum::Json(out).into_response())
}

/// How long the requester of an approved export may download it.
pub const EXPORT_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// `GET /api/security/approvals/{id}/export`: the values of an approved
/// `secret_export`, for its requester only, within `EXPORT_WINDOW` of the
/// approval running; each read is authorized as the requester is now and
/// audited as `secret_access`.
pub async fn export(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    blocking(move || {
        let r = state.approvals.get(&id)?;
        if r.operation != Operation::SecretExport {
            return Err(ServiceError::BadRequest(format!(
                "approval request {id} is a {}, not a secret_export",
                r.operation
            )));
        }
        if r.requester_id != p.user_id {
            return Err(ServiceError::Forbidden {
                permission: format!("the requester of {id} (only they download its export)"),
            });
        }
        let finished = r.execution.as_ref().and_then(|e| e.finished_at);
        let (Status::Executed, Some(finished)) = (r.status, finished) else {
            return Err(ServiceError::Conflict(format!(
                "approval request {id} is {}; its export is available once executed",
                r.status.as_str()
            )));
        };
        let window = i64::try_from(EXPORT_WINDOW.as_micros()).unwrap_or(i64::MAX);
        if crate::clock::now_us() > finished.saturating_add(window) {
            return Err(ServiceError::Conflict(format!(
                "the download window of {id} closed at {}; request the export again",
                crate::clock::format_us(finished.saturating_add(window))
            )));
        }
        let OperationParams::SecretExport(e) =
            OperationParams::parse(r.operation, &r.params).map_err(ServiceError::BadRequest)?
        else {
            return Err(ServiceError::Internal("export params".into()));
        };
        let secrets = super::encryption::read_export(&state, &p, &e.ids, &meta)?;
        Ok(axum::Json(super::encryption::SecretExportView {
            approval_id: Some(id),
            secrets,
        })
        .into_response())
    })
    .await
}
