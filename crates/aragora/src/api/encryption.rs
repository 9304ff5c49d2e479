//! `/api/security/encryption/*` (key ring health, stats, keys, rotation) and
//! `/api/secrets/*` (the secrets the encryption protects).

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::approvals::accepted;
use super::views::{DryRunsView, MigrationStartedView, SecretValueView, SecretsPage};
use super::{ApiResult, JsonBody, QueryParams, blocking};
use crate::app::AppState;
use crate::approvals::gate::{Gate, gate};
use crate::approvals::params::{KeyRotationParams, MigrationRunParams};
use crate::approvals::{Operation, OperationParams};
use crate::auth::{Principal, RequestMeta};
use crate::encryption::migration::MigrationStore;
use crate::error::ServiceError;

/// Anonymous: nothing secret in it.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.keyring.health()).into_response()
}

pub async fn stats(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(state.keyring.stats()).into_response()
}

/// 503 while sealed: no key is known to open.
pub async fn keys(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let v = state.keyring.keys().map_err(ServiceError::from)?;
    Ok(axum::Json(v).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    reason: String,
    #[serde(default)]
    force: bool,
}

/// Gated (`key_rotation`): the admin rotates at once; anyone else holding
/// `encryption.rotate` or `approvals.request` gets 202 and an approval request
/// that runs the rotation, as them, once approved.
pub async fn rotate(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<RotateBody>,
) -> ApiResult<Response> {
    // Sealed: 503 now, not an approval request that could only fail.
    state
        .keyring
        .ensure_unsealed()
        .map_err(ServiceError::from)?;
    blocking(move || {
        let params = OperationParams::KeyRotation(KeyRotationParams { force: b.force });
        match gate(&state, &p, &meta, &params, &b.reason)? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => Ok(axum::Json(state.keyring.rotate(
                &p.user_id,
                meta.ip_string(),
                &b.reason,
                b.force,
            )?)
            .into_response()),
        }
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
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
    let (secret, value) = blocking(move || state.secrets.get(&p, &id, &meta)).await?;
    Ok(axum::Json(SecretValueView { secret, value }).into_response())
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    ids: Vec<String>,
    reason: String,
}

/// Several secrets' values at once: the admin's call, or an approved
/// `secret_export` downloaded by its requester. Deliberately not `Debug`: it
/// carries secret values.
#[allow(missing_debug_implementations)]
#[derive(Serialize, utoipa::ToSchema)]
pub struct SecretExportView {
    /// The approval request the export ran under (none for the admin's call).
    pub approval_id: Option<String>,
    pub secrets: Vec<SecretValueView>,
}

/// Reads every secret of an export as `p` (each read authorized and audited
/// as `secret_access`, like `GET /api/secrets/{id}`).
pub(crate) fn read_export(
    state: &AppState,
    p: &Principal,
    ids: &[String],
    meta: &RequestMeta,
) -> Result<Vec<SecretValueView>, ServiceError> {
    ids.iter()
        .map(|id| {
            let (secret, value) = state.secrets.get(p, id, meta)?;
            Ok(SecretValueView { secret, value })
        })
        .collect()
}

/// Gated (`secret_export`): the admin gets the values at once; anyone else
/// gets 202, and once approved downloads them with
/// `GET /api/security/approvals/{id}/export`.
pub async fn export_secrets(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<ExportBody>,
) -> ApiResult<Response> {
    state
        .keyring
        .ensure_unsealed()
        .map_err(ServiceError::from)?;
    blocking(move || {
        let params =
            OperationParams::parse(Operation::SecretExport, &serde_json::json!({"ids": b.ids}))
                .map_err(ServiceError::BadRequest)?;
        match gate(&state, &p, &meta, &params, &b.reason)? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => {
                let OperationParams::SecretExport(e) = params else {
                    return Err(ServiceError::Internal("export params".into()));
                };
                let secrets = read_export(&state, &p, &e.ids, &meta)?;
                Ok(axum::Json(SecretExportView {
                    approval_id: None,
                    secrets,
                })
                .into_response())
            }
        }
    })
    .await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only secrets after this id (`next_after` of the previous page).
    after: Option<String>,
    /// Secrets per page: clamped to 1 to 1000, default 100.
    limit: Option<usize>,
}

pub async fn list_secrets(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Response> {
    let (items, next) = blocking(move || {
        state
            .secrets
            .list(&p, q.after.as_deref(), q.limit.unwrap_or(100))
    })
    .await?;
    Ok(axum::Json(SecretsPage {
        count: items.len(),
        secrets: items,
        next_after: next,
    })
    .into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MigrationStatusQuery {
    /// The store whose migration to show (secrets); default: the latest run.
    store: Option<String>,
}

pub async fn migration_status(
    State(state): State<Arc<AppState>>,
    QueryParams(q): QueryParams<MigrationStatusQuery>,
) -> ApiResult<Response> {
    let v = blocking(move || Ok(state.migration.status(q.store.as_deref())?)).await?;
    Ok(axum::Json(v).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationRunBody {
    store: String,
    #[serde(default)]
    dry_run: bool,
}

/// A dry run answers at once; a run starts in the background (202) and its
/// progress is in `GET /api/security/migration/status`.
pub async fn migration_run(
    State(state): State<Arc<AppState>>,
    Extension(p): Extension<Principal>,
    Extension(meta): Extension<RequestMeta>,
    JsonBody(b): JsonBody<MigrationRunBody>,
) -> ApiResult<Response> {
    let stores = MigrationStore::parse(&b.store).map_err(ServiceError::from)?;
    // A migration decrypts every record: sealed, it answers 503 at once
    // rather than starting a job (or asking for an approval) that must fail.
    state
        .keyring
        .ensure_unsealed()
        .map_err(ServiceError::from)?;
    if b.dry_run {
        if state.rbac.evaluate(&p.roles, "migration.run").is_none() {
            // Let through by the gate's approvals.request; a dry run is no request.
            let m = axum::http::Method::POST;
            super::deny(
                &state,
                &p,
                "migration.run",
                &m,
                "/api/security/migration/run",
                &meta,
            );
            return Err(ServiceError::Forbidden {
                permission: "migration.run".into(),
            }
            .into());
        }
        let v = blocking(move || {
            let mut out = Vec::new();
            for s in stores {
                out.push(state.migration.dry_run(s)?);
            }
            Ok(DryRunsView { results: out })
        })
        .await?;
        return Ok(axum::Json(v).into_response());
    }
    blocking(move || {
        let params = OperationParams::MigrationRun(MigrationRunParams {
            store: b.store.clone(),
        });
        let reason = format!("re-encryption migration of {}", b.store);
        match gate(&state, &p, &meta, &params, &reason)? {
            Gate::Requested(r) => Ok(accepted(&r)),
            Gate::Run => {
                let job = state.jobs.start_migration(&b.store, &p.user_id)?;
                Ok((
                    StatusCode::ACCEPTED,
                    axum::Json(MigrationStartedView {
                        started: true,
                        store: b.store,
                        job_id: job.id,
                        kind: job.kind,
                    }),
                )
                    .into_response())
            }
        }
    })
    .await
}

/// A job's state and results.
pub async fn job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let job = blocking(move || Ok(state.jobs.get(&id)?)).await?;
    Ok(axum::Json(job).into_response())
}
