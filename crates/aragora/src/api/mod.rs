//! HTTP: the route table (every route with the permission it requires), the
//! middleware that identifies and authorizes callers, and the mapping of
//! service errors to statuses with a JSON body naming what is wrong.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod encryption;
pub mod http;
pub mod openapi;
pub mod rbac;
pub mod system;
pub mod views;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::app::AppState;
use crate::approvals::Operation;
use crate::audit::{AuditEvent, Outcome};
use crate::auth::tokens::SessionPrefetch;
use crate::auth::{Principal, RequestMeta};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::maintenance::MaintenanceMode;
use crate::rbac::{catalogue, roles_label};
use doc_types::*;

/// The types the route table documents, in one place.
mod doc_types {
    pub use super::openapi::{NoBody, Optional, Text};
    pub use super::views::*;
    pub use crate::admission::AdmissionView;
    pub use crate::approvals::request::CreatedView;
    pub use crate::audit::{SearchResult, VerifyReport};
    pub use crate::auth::DeletedUser;
    pub use crate::auth::model::{IpBlockView, UserView};
    pub use crate::auth::tokens::RevokeAllOutcome;
    pub use crate::auth::users::BulkLockOutcome;
    pub use crate::encryption::migration::MigrationView;
    pub use crate::encryption::{EncryptionHealth, EncryptionStats, KeysView, RotationOutcome};
    pub use crate::jobs::JobRecord;
    pub use crate::maintenance::MaintenanceChange;
    pub use crate::rbac::denials::DenialRow;
    pub use crate::rbac::{CacheStats, CustomRole, PermissionView, RoleView};
    pub use crate::secrets::SecretView;
}

/// Request bodies above this are refused with 413 before parsing.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An error response: status plus `{"error": message, ...}`.
#[derive(Debug)]
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.0.to_string();
        let (status, body, extra): (
            StatusCode,
            serde_json::Value,
            Option<(header::HeaderName, String)>,
        ) = match &self.0 {
            ServiceError::BadRequest(_) => (StatusCode::BAD_REQUEST, json!({"error": msg}), None),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, json!({"error": msg}), None),
            ServiceError::Conflict(_) => (StatusCode::CONFLICT, json!({"error": msg}), None),
            ServiceError::JobRunning { job_id, kind, .. } => (
                StatusCode::CONFLICT,
                json!({"error": msg, "job_id": job_id, "kind": kind}),
                None,
            ),
            ServiceError::Unauthorized { reason, .. } => (
                StatusCode::UNAUTHORIZED,
                json!({"error": msg, "reason": reason}),
                Some((
                    header::WWW_AUTHENTICATE,
                    format!("Bearer error=\"invalid_token\", error_description=\"{reason}\""),
                )),
            ),
            ServiceError::Forbidden { permission } => (
                StatusCode::FORBIDDEN,
                json!({"error": msg, "permission": permission}),
                None,
            ),
            ServiceError::Blocked { .. } => (
                StatusCode::FORBIDDEN,
                json!({"error": msg, "reason": "ip_blocked"}),
                None,
            ),
            ServiceError::Locked {
                retry_after_secs, ..
            } => (
                StatusCode::LOCKED,
                json!({"error": msg, "reason": "locked"}),
                Some((header::RETRY_AFTER, retry_after_secs.to_string())),
            ),
            ServiceError::RateLimited { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": msg, "reason": "rate_limited"}),
                Some((header::RETRY_AFTER, retry_after_secs.to_string())),
            ),
            ServiceError::Unavailable(_) => {
                tracing::error!(error = %msg, "service unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": msg}),
                    Some((header::RETRY_AFTER, "1".to_string())),
                )
            }
            // Not logged per request: health, the active-keys gauge and the
            // boot log already say so once, and a sealed server refuses many.
            ServiceError::Sealed(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": msg, "reason": "sealed"}),
                None,
            ),
            // Logged with the request id, which also goes into the body
            // (`http::internal_errors`), so a report can be matched to the log.
            ServiceError::Internal(_) => return http::internal_error(msg),
            ServiceError::Backend(_) => {
                let mut resp = http::hidden_error(StatusCode::SERVICE_UNAVAILABLE, msg);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return resp;
            }
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if let Some((name, value)) = extra
            && let Ok(v) = HeaderValue::from_str(&value)
        {
            resp.headers_mut().insert(name, v);
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(ServiceError::BadRequest(msg.into()))
}

/// A JSON body, whatever the Content-Type (the runbook's `curl -d` sends a form
/// content type); parse errors name the field, line and column.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                bad_request(format!(
                    "request body is larger than {MAX_BODY_BYTES} bytes"
                ))
            } else {
                bad_request(format!("request body could not be read: {e}"))
            }
        })?;
        if bytes.is_empty() {
            return Err(bad_request(
                "request body is empty; a JSON object is expected",
            ));
        }
        // axum's rejection text names the field path (`roles[0]: invalid type ...`).
        axum::Json::<T>::from_bytes(&bytes)
            .map(|j| JsonBody(j.0))
            .map_err(|e| bad_request(format!("request body is not valid: {}", e.body_text())))
    }
}

/// A JSON body of at most `LIMIT` bytes (routes that anonymous callers
/// reach take far less than the general limit); a larger body is a 400 naming
/// the limit, read no further than it.
#[derive(Debug)]
pub struct LimitedJsonBody<T, const LIMIT: usize>(pub T);

impl<S: Send + Sync, T: DeserializeOwned, const LIMIT: usize> FromRequest<S>
    for LimitedJsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), LIMIT)
            .await
            .map_err(|_| bad_request(format!("request body is larger than {LIMIT} bytes")))?;
        if bytes.is_empty() {
            return Err(bad_request(
                "request body is empty; a JSON object is expected",
            ));
        }
        axum::Json::<T>::from_bytes(&bytes)
            .map(|j| LimitedJsonBody(j.0))
            .map_err(|e| bad_request(format!("request body is not valid: {}", e.body_text())))
    }
}

/// An optional JSON body: empty (or whitespace) is the default value.
pub fn optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body is not valid: {e}")))
}

/// Query parameters; a bad value names its parameter.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // axum's rejection text names the parameter (`minutes: invalid digit ...`).
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| bad_request(format!("query string is not valid: {}", e.body_text())))
    }
}

/// One route: method, path, the permission it requires (`None`: anonymous) and
/// a summary (served as the API description at `/api/routes`).
#[derive(Clone, Copy, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub permission: Option<&'static str>,
    pub summary: &'static str,
}

type Handler = fn() -> MethodRouter<Arc<AppState>>;

/// A route line: `METHOD "path" permission, "summary" => handler, RequestBody,
/// [status Response, ...]` and, for a handler taking `QueryParams<Q>`,
/// `, query Q` before the `;` (documented as the operation's query parameters).
macro_rules! routes {
    (@query) => { openapi::no_query };
    (@query $q:ty) => { openapi::query_params::<$q> };
    ($( $method:ident $path:literal $perm:expr, $summary:literal => $handler:path, $req:ty, [$($status:literal $resp:ty),+] $(, query $query:ty)?; )*) => {
        /// Every route of the API.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec { method: stringify!($method), path: $path, permission: $perm, summary: $summary }, )*
        ];
        fn handlers() -> Vec<Handler> {
            vec![ $( || on(method_filter(stringify!($method)), $handler), )* ]
        }
        /// Each route's query parameters, request body and success responses,
        /// in `ROUTES` order.
        pub fn route_docs() -> Vec<openapi::RouteDoc> {
            vec![ $( openapi::RouteDoc {
                query: routes!(@query $($query)?),
                request: <$req as openapi::DocBody>::doc,
                responses: vec![ $( ($status, <$resp as openapi::DocBody>::doc) ),+ ],
            }, )* ]
        }
    };
}

fn method_filter(m: &str) -> MethodFilter {
    match m {
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        "DELETE" => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    }
}

const A: Option<&str> = None;

routes! {
    GET "/api/health" A, "Liveness and store status" => system::health, NoBody, [200 HealthView];
    GET "/metrics" A, "Prometheus metrics" => system::metrics, NoBody, [200 Text];
    GET "/api/routes" A, "This route table with each route's permission" => system::routes, NoBody, [200 RoutesView];
    GET "/api/openapi.json" A, "OpenAPI 3.1 description of every route" => system::openapi, NoBody, [200 serde_json::Value];
    POST "/api/auth/login" A, "Password login: {email, password} -> {access_token, token_type, expires_in}" => auth::login, auth::LoginBody, [200 LoginView];
    POST "/api/auth/logout" Some("self.read"), "Revoke the caller's session" => auth::logout, NoBody, [204 NoBody];
    GET "/api/auth/me" Some("self.read"), "The caller's account, roles and permissions" => auth::me, NoBody, [200 MeView];
    POST "/api/auth/password" Some("self.read"), "Change one's own password: {current_password, new_password}; every other session of the caller ends" => auth::change_password, auth::PasswordChangeBody, [204 NoBody];
    GET "/api/auth/api-keys" Some("self.read"), "The caller's API keys (metadata)" => auth::list_keys, NoBody, [200 ApiKeysView];
    POST "/api/auth/api-keys" Some("self.api_keys"), "Create an API key for the caller: {name} -> {token} (shown once)" => auth::create_key, auth::KeyBody, [201 CreatedKeyView];
    DELETE "/api/auth/api-keys/{key_id}" Some("self.api_keys"), "Revoke one of the caller's API keys" => auth::revoke_key, NoBody, [200 RevokedIdsView];
    GET "/api/admin/users" Some("users.read"), "Users with last_active_at, a top-level array in id order (?role=, ?limit= 1-1000, default 100, ?after=ID); Link: </api/admin/users?...&after=ID&limit=N>; rel=\"next\" when more follow" => admin::list_users, NoBody, [200 Vec<UserView>], query admin::ListUsersQuery;
    POST "/api/admin/users" Some("users.manage"), "Create a user: {email, password?, roles}" => admin::create_user, admin::CreateUserBody, [201 UserView];
    GET "/api/admin/users/{id}" Some("users.read"), "One user" => admin::get_user, NoBody, [200 UserView];
    DELETE "/api/admin/users/{id}" Some("users.manage"), "Delete a user, its sessions and API keys: {reason?}; gated (user_delete: 202 unless admin)" => admin::delete_user, Optional<admin::OptionalReasonBody>, [200 DeletedUser, 202 CreatedView];
    POST "/api/admin/users/{id}/roles" Some("users.manage"), "Assign a role: {role, reason?}; a role holding a sensitive permission is gated (privileged_role_grant: 202 unless admin)" => admin::add_role, admin::AssignRoleBody, [200 UserView, 202 CreatedView];
    DELETE "/api/admin/users/{id}/roles/{role}" Some("users.manage"), "Remove a role" => admin::remove_role, NoBody, [200 UserView];
    POST "/api/admin/users/{id}/password" Some("users.manage"), "Set a password: {password}" => admin::set_password, admin::PasswordBody, [204 NoBody];
    POST "/api/admin/users/{id}/disable" Some("users.disable"), "Disable a user: {reason}; effective on the next request" => admin::disable, admin::ReasonBody, [200 UserView];
    POST "/api/admin/users/{id}/enable" Some("users.disable"), "Re-enable a user" => admin::enable, NoBody, [200 UserView];
    POST "/api/admin/users/{id}/unlock" Some("users.lock"), "Clear a lockout" => admin::unlock, NoBody, [200 UserView];
    POST "/api/admin/users/{id}/revoke-keys" Some("users.revoke_keys"), "Revoke every API key of a user" => admin::revoke_keys, NoBody, [200 RevokedKeysView];
    POST "/api/admin/users/{id}/api-keys" Some("users.manage"), "Create an API key for a user: {name}" => admin::create_key, auth::KeyBody, [201 CreatedKeyView];
    GET "/api/admin/users/{id}/permissions" Some("users.read"), "A user's roles and effective permissions" => admin::permissions, NoBody, [200 UserPermissionsView];
    GET "/api/admin/users/{id}/sessions" Some("users.read"), "A user's sessions" => admin::sessions, NoBody, [200 UserSessionsView];
    POST "/api/admin/users/{id}/sessions/revoke" Some("sessions.revoke"), "Revoke a user's sessions" => admin::revoke_user_sessions, Optional<admin::RevokeSessionsBody>, [200 RevokedSessionsView];
    POST "/api/admin/users/bulk-lock" Some("users.lock"), "Lock accounts: {emails, duration}" => admin::bulk_lock, admin::BulkLockBody, [200 BulkLockOutcome];
    POST "/api/admin/sessions/revoke-all" Some("sessions.revoke"), "Revoke every session (lockdown): {reason?}; gated (sessions_revoke_all: 202 unless admin)" => admin::revoke_all, Optional<admin::OptionalReasonBody>, [200 RevokeAllOutcome, 202 CreatedView];
    POST "/api/admin/ratelimit/block" Some("ratelimit.manage"), "Block an IP or CIDR network: {ip, duration, reason}" => admin::block_ip, admin::BlockBody, [201 IpBlockView];
    GET "/api/admin/ratelimit/blocks" Some("ratelimit.read"), "Active IP blocks" => admin::list_blocks, NoBody, [200 BlocksView];
    DELETE "/api/admin/ratelimit/blocks/{ip}" Some("ratelimit.manage"), "Remove an IP block ({ip}: the block's ip, slash URL-encoded); gated (ip_unblock, low risk: 202 unless admin)" => admin::unblock_ip, NoBody, [204 NoBody, 202 CreatedView];
    POST "/api/admin/maintenance" Some("sessions.revoke"), "Switch the runtime maintenance mode: {mode: off|read-only|on} (read-only refuses writes except /api/admin/*; on serves only health, metrics and /api/admin/*); audited as maintenance_mode_changed" => admin::set_maintenance, admin::MaintenanceBody, [200 MaintenanceChange];
    POST "/api/admin/admission" Some("sessions.revoke"), "Set the store's commit admission rate: {max_commits_per_sec: N} or {unlimited: true} (commits beyond it get 503; runtime only, a restart starts unlimited); audited as admission_changed" => admin::set_admission, admin::AdmissionBody, [200 AdmissionView];
    GET "/api/admin/roles" Some("rbac.read"), "Built-in and custom roles" => rbac::roles, NoBody, [200 Vec<RoleView>];
    POST "/api/admin/roles" Some("roles.manage"), "Create or replace a custom role: {name, permissions, description, reason?}; with a sensitive permission gated (custom_role_change: 202 unless admin)" => rbac::put_role, rbac::CustomRoleBody, [201 CustomRole, 202 CreatedView];
    DELETE "/api/admin/roles/{name}" Some("roles.manage"), "Delete a custom role (refused while assigned)" => rbac::delete_role, NoBody, [204 NoBody];
    GET "/api/security/rbac/permissions" Some("rbac.read"), "The permission catalogue (array)" => rbac::permissions, NoBody, [200 Vec<PermissionView>];
    GET "/api/security/rbac/roles" Some("rbac.read"), "Built-in and custom roles" => rbac::roles, NoBody, [200 Vec<RoleView>];
    GET "/api/security/rbac/cache/stats" Some("rbac.read"), "Decision cache: hits, misses, hit_rate, size, ttl, backend" => rbac::cache_stats, NoBody, [200 CacheStats];
    POST "/api/security/rbac/cache/clear" Some("rbac.manage"), "Empty the decision cache" => rbac::cache_clear, NoBody, [200 CacheClearedView];
    POST "/api/security/rbac/cache/warmup" Some("rbac.manage"), "Precompute decisions for every active user" => rbac::cache_warmup, NoBody, [200 CacheWarmupView];
    GET "/api/security/rbac/denials/recent" Some("rbac.read"), "Denials of the last ?minutes= (default 15) by user, permission, role" => rbac::denials_recent, NoBody, [200 Vec<DenialRow>], query rbac::DenialsQuery;
    GET "/api/security/audit/search" Some("audit.read"), "Audit entries by ?action=, ?actor=, ?minutes=, ?limit=, ?before=" => audit::search, NoBody, [200 SearchResult], query audit::SearchQuery;
    GET "/api/security/audit/verify" Some("audit.read"), "Verify the audit hash chain" => audit::verify, NoBody, [200 VerifyReport];
    GET "/api/security/encryption/health" A, "Key ring health: {status, master_key_loaded, active_key_id, active_keys, sealed, sealed_reason?, message?} (nothing secret)" => encryption::health, NoBody, [200 EncryptionHealth];
    GET "/api/security/encryption/stats" Some("encryption.read"), "Encrypt/decrypt counts and latency percentiles, derivation_latency_p95, decrypts_per_actor (last minute)" => encryption::stats, NoBody, [200 EncryptionStats];
    GET "/api/security/encryption/keys" Some("encryption.read"), "Key ring metadata: {active_count, primary_key_id, keys}" => encryption::keys, NoBody, [200 KeysView, 503 ErrorView];
    POST "/api/security/encryption/rotate" Some("encryption.rotate"), "Rotate the primary data key: {reason, force}; gated (key_rotation: 202 unless admin)" => encryption::rotate, encryption::RotateBody, [200 RotationOutcome, 202 CreatedView, 503 ErrorView];
    GET "/api/secrets" Some("secrets.list"), "Secret metadata (?after=, ?limit=); never values" => encryption::list_secrets, NoBody, [200 SecretsPage], query encryption::ListQuery;
    PUT "/api/secrets/{*id}" Some("secrets.write"), "Create or replace a secret: {value, secret_type, owner?}" => encryption::put_secret, encryption::PutSecretBody, [200 SecretView, 201 SecretView, 503 ErrorView];
    GET "/api/secrets/{*id}" Some("secrets.read"), "Decrypt a secret (audited as secret_access)" => encryption::get_secret, NoBody, [200 SecretValueView, 503 ErrorView];
    DELETE "/api/secrets/{*id}" Some("secrets.delete"), "Delete a secret" => encryption::delete_secret, NoBody, [204 NoBody];
    POST "/api/security/secrets/export" Some("secrets.read"), "Export several secrets' values: {ids (at most 100), reason}; gated (secret_export: 202 unless admin)" => encryption::export_secrets, encryption::ExportBody, [200 encryption::SecretExportView, 202 CreatedView, 503 ErrorView];
    POST "/api/security/approvals" Some("approvals.request"), "Request a gated operation: {operation, params, reason} -> 202 {approval_id, status, operation, risk_level, expires_at}" => approvals::create, approvals::RequestBody, [202 serde_json::Value];
    GET "/api/security/approvals" Some("approvals.read"), "Approval requests, newest first (?status=, ?operation=, ?before=, ?limit=)" => approvals::history, NoBody, [200 serde_json::Value], query approvals::HistoryQuery;
    GET "/api/security/approvals/pending" Some("approvals.read"), "Pending approval requests, oldest first (?risk_level=): array of {id, operation, risk_level, requested_at, requester_id, reason, checklist, approvals, required_approvals, expires_at}" => approvals::pending, NoBody, [200 serde_json::Value], query approvals::PendingQuery;
    GET "/api/security/approvals/{id}" Some("approvals.read"), "One approval request, any status, with decisions and result" => approvals::get, NoBody, [200 serde_json::Value];
    GET "/api/security/approvals/{id}/export" Some("self.read"), "The values of an approved secret_export, for its requester, within an hour of it running (each read audited as secret_access)" => approvals::export, NoBody, [200 encryption::SecretExportView, 503 ErrorView];
    GET "/api/security/approvals/{id}/eligible-approvers" Some("approvals.read"), "Who may decide: array of {id, email, roles, last_active_at}" => approvals::eligible_approvers, NoBody, [200 serde_json::Value];
    POST "/api/security/approvals/{id}/approve" Some("self.read"), "Approve: {notes?, reason?, checklist_confirmed?, bypass_checklist? (admin)}; eligible approvers only, never the requester" => approvals::approve, approvals::ApproveBody, [200 serde_json::Value];
    POST "/api/security/approvals/{id}/reject" Some("self.read"), "Reject: {reason} (required)" => approvals::reject, approvals::RejectBody, [200 serde_json::Value];
    POST "/api/security/approvals/{id}/emergency-bypass" Some("self.read"), "Emergency bypass: {reason, incident_id} (security_lead; audited at critical severity)" => approvals::emergency_bypass, approvals::BypassBody, [200 serde_json::Value];
    GET "/api/security/jobs/{id}" Some("migration.read"), "A long operation (migration run): state, stores, per-store results, resumed" => encryption::job, NoBody, [200 JobRecord];
    GET "/api/security/migration/status" Some("migration.read"), "Re-encryption migration progress (?store=): {state, store, total, migrated, failed, skipped, failed_records, started_at, finished_at}" => encryption::migration_status, NoBody, [200 MigrationView], query encryption::MigrationStatusQuery;
    POST "/api/security/migration/run" Some("migration.run"), "Start a re-encryption migration in the background: {store, dry_run?} (dry_run answers at once); gated (migration_run: 202 with an approval request unless admin)" => encryption::migration_run, encryption::MigrationRunBody, [200 DryRunsView, 202 MigrationRunAccepted, 409 ErrorView, 503 ErrorView];
}

/// Builds the router: each route behind its permission guard, then the IP block
/// check, then maintenance mode, all inside the HTTP envelope (`http`: request
/// ids, timeout, body limit, security headers).
pub fn router(state: Arc<AppState>) -> Router {
    let mut router: Router<Arc<AppState>> = Router::new();
    for (spec, make) in ROUTES.iter().zip(handlers()) {
        let mut mr = make();
        if let Some(permission) = spec.permission {
            mr = mr.route_layer(middleware::from_fn_with_state(
                (state.clone(), permission),
                guard,
            ));
        }
        router = router.route(spec.path, mr);
    }
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), identify))
        .layer(middleware::from_fn_with_state(state.clone(), maintenance))
        .layer(middleware::from_fn_with_state(state.clone(), catch_up));
    http::envelope(router, &state.config).with_state(state)
}

/// On a shared store, reloads what another replica changed (roles, IP
/// blocks, key ring, maintenance mode) before anything else looks at the
/// request: a change is enforced on every replica's next request
/// (`crate::cluster`). A store that cannot be read fails the request rather
/// than deciding it from state that may be stale. Liveness and metrics are
/// answered regardless, so a store outage does not restart every pod. A
/// session token's records are read in the same round trip and handed to
/// `guard` (`SessionPrefetch`).
async fn catch_up(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !state.cluster.enabled() || path == "/api/health" || path == "/metrics" {
        return next.run(req).await;
    }
    let authorization = authorization_header(&req).map(str::to_string);
    let mut req = req;
    match state.catch_up_reading_async(authorization.as_deref()).await {
        Ok(prefetch) => {
            if let Some(p) = prefetch {
                req.extensions_mut().insert(p);
            }
            next.run(req).await
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot bring this replica up to the shared store");
            ApiError(ServiceError::Unavailable(format!(
                "this replica cannot confirm the current roles, blocks and keys with the store: {e}"
            )))
            .into_response()
        }
    }
}

fn is_exempt_from_maintenance(path: &str) -> bool {
    path == "/api/health" || path == "/metrics" || path.starts_with("/api/admin/")
}

/// The runtime maintenance mode (`crate::maintenance`). `on` (the lockdown,
/// MAINTENANCE_MODE=true): every request gets 503 except liveness, metrics
/// and the admin endpoints (which still need a token). `read-only`: every
/// write (a method other than GET, HEAD or OPTIONS) gets 503 naming the mode,
/// except the admin incident actions under `/api/admin/*`.
async fn maintenance(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let refused = match state.maintenance.mode() {
        MaintenanceMode::Off => None,
        MaintenanceMode::On => (!is_exempt_from_maintenance(path))
            .then_some("maintenance mode: only health, metrics and admin recovery are served"),
        MaintenanceMode::ReadOnly => {
            let read = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
            (!read && !is_exempt_from_maintenance(path)).then_some(
                "maintenance mode read-only: writes are refused until an operator sets it off \
                 (reads and /api/admin/* incident actions are served)",
            )
        }
    };
    if let Some(message) = refused {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "60")],
            axum::Json(json!({
                "error": message,
                "maintenance_mode": state.maintenance.mode().name(),
            })),
        )
            .into_response();
    }
    next.run(req).await
}

/// The client address: the socket peer, or the first X-Forwarded-For hop when
/// the peer is a trusted proxy; IPv4-mapped addresses in IPv4 form.
fn client_ip(state: &AppState, req: &Request) -> Option<IpAddr> {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| crate::net::normalize(c.0.ip()))?;
    Some(forwarded_client(
        peer,
        req.headers(),
        &state.config.trusted_proxies,
    ))
}

/// Walks X-Forwarded-For from the right (the hop our own proxy appended)
/// while the address is a trusted proxy; the first untrusted address is the
/// client. The leftmost hops are whatever the client wrote and are never
/// believed on their own. An unparsable hop stops the walk at the last
/// trusted address.
fn forwarded_client(
    peer: IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer;
    if !is_trusted(&peer) {
        return client;
    }
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = crate::net::normalize(ip);
                if !is_trusted(&client) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// Attaches the request metadata and refuses blocked addresses (health and
/// metrics stay reachable for probes).
async fn identify(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let meta = RequestMeta {
        ip: client_ip(&state, &req),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(200).collect()),
    };
    if let Some(ip) = meta.ip {
        // Every line logged for this request names its client.
        tracing::Span::current().record("client_ip", tracing::field::display(ip));
    }
    let path = req.uri().path();
    if path != "/api/health"
        && path != "/metrics"
        && let Some(ip) = meta.ip
        && let Some(block) = state.auth.blocked(ip)
    {
        return ApiError(ServiceError::Blocked {
            message: format!(
                "requests from {ip} are blocked ({}) until {}",
                block.ip,
                crate::clock::format_us(block.expires_at)
            ),
        })
        .into_response();
    }
    req.extensions_mut().insert(meta);
    next.run(req).await
}

/// Routes whose call is an approval gate (see `approvals::gate`): the path
/// as the router matched it, without parameters.
const GATED_ROUTES: &[(&str, &str, Operation)] = &[
    (
        "POST",
        "/api/security/encryption/rotate",
        Operation::KeyRotation,
    ),
    (
        "POST",
        "/api/security/migration/run",
        Operation::MigrationRun,
    ),
    (
        "POST",
        "/api/admin/sessions/revoke-all",
        Operation::SessionsRevokeAll,
    ),
    (
        "POST",
        "/api/security/secrets/export",
        Operation::SecretExport,
    ),
];

/// The operation a route's call asks for when the caller lacks the route's
/// permission but holds `approvals.request`.
pub fn gated_operation(method: &str, path: &str) -> Option<Operation> {
    GATED_ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, op)| *op)
}

fn is_gated(method: &Method, path: &str) -> bool {
    gated_operation(method.as_str(), path).is_some()
}

/// Authenticates the bearer credential and checks the route's permission;
/// denials are audited and counted.
async fn guard(
    State((state, permission)): State<(Arc<AppState>, &'static str)>,
    mut req: Request,
    next: Next,
) -> Response {
    let meta = req
        .extensions()
        .get::<RequestMeta>()
        .cloned()
        .unwrap_or_default();
    let prefetch = req.extensions_mut().remove::<SessionPrefetch>();
    // The common case on a shared store, decided here: a live session whose
    // records were read ahead, allowed, with nothing to write.
    if let Some(p) = &prefetch
        && let Some(principal) = state
            .auth
            .principal_without_io(authorization_header(&req), p)
        && state
            .rbac
            .check(&principal.user_id, &principal.roles, permission)
            .allowed
    {
        req.extensions_mut().insert(principal);
        return next.run(req).await;
    }
    // On a shared store authentication is a network round trip: off the
    // async workers, or two slow reads would stall every connection. The
    // embedded store answers in microseconds, less than a hop to the
    // blocking pool (and the copies it needs) costs.
    let decided = if state.cluster.enabled() {
        let authorization = authorization_header(&req).map(str::to_string);
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let s = state.clone();
        match tokio::task::spawn_blocking(move || {
            authorize(
                &s,
                permission,
                authorization.as_deref(),
                prefetch.as_ref(),
                &meta,
                &method,
                &path,
            )
        })
        .await
        {
            Ok(d) => d,
            Err(e) => Err(ApiError(ServiceError::Internal(format!(
                "authorization task: {e}"
            )))),
        }
    } else {
        authorize(
            &state,
            permission,
            authorization_header(&req),
            None,
            &meta,
            req.method(),
            req.uri().path(),
        )
    };
    match decided {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The Authorization header; one that is not text is kept as a value no
/// credential matches, so it is refused as invalid rather than missing.
fn authorization_header(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}invalid"))
}

/// Who is calling and whether `permission` (or, on a gated route,
/// `approvals.request`) lets them through; a refusal is audited.
fn authorize(
    state: &AppState,
    permission: &'static str,
    authorization: Option<&str>,
    prefetch: Option<&SessionPrefetch>,
    meta: &RequestMeta,
    method: &Method,
    path: &str,
) -> Result<Principal, ApiError> {
    let principal = state
        .auth
        .authenticate_prefetched(authorization, meta, prefetch)?;
    let decision = state
        .rbac
        .check(&principal.user_id, &principal.roles, permission);
    // A gated route is also open to holders of approvals.request: their call
    // becomes an approval request (the handler's gate decides), never a run.
    let asks = !decision.allowed
        && is_gated(method, path)
        && state
            .rbac
            .check(&principal.user_id, &principal.roles, "approvals.request")
            .allowed;
    if !decision.allowed && !asks {
        deny(state, &principal, permission, method, path, meta);
        return Err(ApiError(ServiceError::Forbidden {
            permission: permission.to_string(),
        }));
    }
    Ok(principal)
}

pub(crate) fn deny(
    state: &AppState,
    p: &Principal,
    permission: &str,
    method: &Method,
    path: &str,
    meta: &RequestMeta,
) {
    let sensitive = catalogue::is_sensitive(permission);
    let event = AuditEvent::new("permission_denied", p.user_id.clone(), Outcome::Denied)
        .ip(meta.ip_string())
        .details(json!({
            "permission": permission,
            "role": roles_label(&p.roles),
            "sensitive": sensitive,
            "method": method.as_str(),
            "path": path,
        }));
    if let Err(e) = state.audit.record(event) {
        tracing::error!(error = %e, "permission_denied could not be audited");
    }
    // The line the runbook greps and cuts with `awk '{print $NF}'`: the
    // actor is the last field.
    let ip = meta.ip_string();
    tracing::warn!(
        permission = %permission,
        sensitive,
        method = %method,
        path = %path,
        ip = %ip.as_deref().unwrap_or("-"),
        actor = %p.user_id,
        "permission_denied"
    );
}

/// Every error response is JSON: axum's own rejections (an undecodable path
/// parameter, ...) are plain text, wrapped here as `{"error": text}`.
pub(crate) async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    // The body limit (tower-http) answers in plain text without the limit.
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body is larger than {MAX_BODY_BYTES} bytes")
    } else if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = (status, axum::Json(json!({"error": message}))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// How long a request waits for a password-hashing slot before a 503.
pub const PASSWORD_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `blocking` for work that hashes or verifies a password: at most
/// `password_slots` at once, the rest wait (asynchronously) up to
/// `PASSWORD_SLOT_WAIT`, then get 503 with Retry-After.
pub async fn hashing<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> ApiResult<T> {
    let busy = || {
        ApiError(ServiceError::Unavailable(
            "too many password checks in progress; retry in a second".into(),
        ))
    };
    let _slot = tokio::time::timeout(PASSWORD_SLOT_WAIT, state.password_slots.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    blocking(f).await
}

/// Runs blocking service work (password hashing, durable writes) off the async
/// workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> ApiResult<T> {
    // The request's span (its id and client address) goes along, so what
    // the work logs on the blocking pool is found with its request.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| ApiError(ServiceError::Internal(format!("worker failed: {e}"))))?
        .map_err(ApiError)
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": format!("no route for {} {}", req.method(), req.uri().path())})),
    )
        .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(
            json!({"error": format!("{} is not allowed on {}", req.method(), req.uri().path())}),
        ),
    )
        .into_response()
}

/// Seconds since the epoch, for handlers that show "now".
pub fn now_secs() -> i64 {
    now_us() / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hops(v: &str) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn forwarded_for_is_read_from_the_right() {
        let proxy: IpAddr = "127.0.0.1".parse().expect("ip");
        let trusted = ["127.0.0.1", "10.0.0.2"].map(|s| crate::net::parse_net(s).expect("net"));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // The client wrote a spoofed first hop; the proxy appended the real one.
        assert_eq!(
            forwarded_client(proxy, &hops("198.51.100.1, 203.0.113.66"), &trusted),
            ip("203.0.113.66")
        );
        // Two trusted proxies in a row are skipped.
        assert_eq!(
            forwarded_client(proxy, &hops("203.0.113.5, 10.0.0.2"), &trusted),
            ip("203.0.113.5")
        );
        // An untrusted peer's header is ignored.
        assert_eq!(
            forwarded_client(ip("192.0.2.1"), &hops("203.0.113.5"), &trusted),
            ip("192.0.2.1")
        );
        // Garbage stops at the last trusted address.
        assert_eq!(forwarded_client(proxy, &hops("nonsense"), &trusted), proxy);
        assert_eq!(
            forwarded_client(proxy, &axum::http::HeaderMap::new(), &trusted),
            proxy
        );
    }

    #[test]
    fn trusted_proxies_are_networks_and_mapped_addresses_are_ipv4() {
        let trusted = ["10.1.0.0/16", "fd00::/8"].map(|s| crate::net::parse_net(s).expect("net"));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            forwarded_client(ip("10.1.2.3"), &hops("203.0.113.9, 10.1.9.9"), &trusted),
            ip("203.0.113.9"),
            "both hops inside the proxy network"
        );
        assert_eq!(
            forwarded_client(ip("fd00::5"), &hops("::ffff:203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            forwarded_client(ip("10.1.2.3"), &hops("::ffff:10.1.7.7"), &trusted),
            ip("10.1.7.7"),
            "a mapped proxy address is trusted like its IPv4 form"
        );
        assert_eq!(
            forwarded_client(ip("10.2.0.1"), &hops("203.0.113.9"), &trusted),
            ip("10.2.0.1")
        );
    }
}
