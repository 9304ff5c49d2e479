//! Response bodies the handlers assemble from service views (pages, one-time
//! tokens, small acknowledgements). Every type here is also a schema of the
//! OpenAPI document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::RouteSpec;
use crate::auth::model::{ApiKeyView, IpBlockView, SessionView, UserView};
use crate::encryption::migration::DryRunView;
use crate::jobs::JobKind;
use crate::secrets::SecretView;

/// `GET /api/health`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthView {
    /// Always `ok` when the process answers.
    pub status: String,
    /// True while the runtime maintenance mode is not `off`.
    pub maintenance_mode: bool,
    /// The runtime maintenance mode: `off`, `read-only` (writes refused) or
    /// `on` (lockdown).
    pub maintenance: String,
    /// The key ring is sealed (no usable master key): secrets and key
    /// operations answer 503 until it is unsealed; the rest serves.
    pub sealed: bool,
    pub store: StoreView,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StoreView {
    /// `aedb` (embedded).
    pub backend: String,
}

/// `GET /api/routes`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RoutesView {
    pub routes: Vec<RouteEntry>,
}

/// One route of `GET /api/routes`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RouteEntry {
    #[serde(flatten)]
    pub spec: RouteSpec,
    /// A gated route: a caller without `permission` but with this one
    /// (`approvals.request`) may call it, and the call becomes an approval
    /// request for `gated_operation` (202).
    pub or_to_request: Option<&'static str>,
    pub gated_operation: Option<crate::approvals::Operation>,
}

/// `POST /api/auth/login`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginView {
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds.
    pub expires_in: i64,
    pub session_id: String,
}

/// `GET /api/auth/me`: the caller's account and what it may do.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MeView {
    #[serde(flatten)]
    pub user: UserView,
    pub permissions: Vec<String>,
}

/// A user's API keys.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeysView {
    pub api_keys: Vec<ApiKeyView>,
}

/// A new API key: its metadata and the full token, shown this once.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKeyView {
    #[serde(flatten)]
    pub key: ApiKeyView,
    pub token: String,
    pub note: String,
}

/// `DELETE /api/auth/api-keys/{key_id}`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedIdsView {
    pub revoked: Vec<String>,
}

/// `POST /api/admin/users/{id}/revoke-keys`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedKeysView {
    pub user_id: String,
    pub revoked: usize,
    pub key_ids: Vec<String>,
}

/// `POST /api/admin/users/{id}/sessions/revoke`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RevokedSessionsView {
    pub user_id: String,
    pub revoked: usize,
    pub session_ids: Vec<String>,
}

/// `GET /api/admin/users/{id}/permissions`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UserPermissionsView {
    pub user_id: String,
    pub email: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub permissions: Vec<String>,
    pub sensitive_permissions: Vec<String>,
}

/// `GET /api/admin/users/{id}/sessions`: sessions and API keys.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UserSessionsView {
    pub user_id: String,
    pub active_sessions: usize,
    pub sessions: Vec<SessionView>,
    pub api_keys: Vec<ApiKeyView>,
}

/// `GET /api/admin/ratelimit/blocks`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct BlocksView {
    pub blocks: Vec<IpBlockView>,
}

/// `POST /api/security/rbac/cache/clear`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CacheClearedView {
    /// Entries dropped.
    pub cleared: usize,
}

/// `POST /api/security/rbac/cache/warmup`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CacheWarmupView {
    pub users: usize,
    /// Decisions computed.
    pub warmed: usize,
}

/// One page of `GET /api/secrets`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SecretsPage {
    pub secrets: Vec<SecretView>,
    pub count: usize,
    pub next_after: Option<String>,
}

/// `GET /api/secrets/{id}`: metadata and the decrypted value.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretValueView {
    #[serde(flatten)]
    pub secret: SecretView,
    pub value: String,
}

/// `POST /api/security/migration/run` with `dry_run`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DryRunsView {
    pub results: Vec<DryRunView>,
}

/// `POST /api/security/migration/run`: the job started in the background.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationStartedView {
    pub started: bool,
    pub store: String,
    /// The job (`GET /api/security/jobs/{id}`).
    pub job_id: String,
    pub kind: JobKind,
}

/// The 202 of `POST /api/security/migration/run`: the job started (an admin)
/// or an approval request waits (`migration_run`, anyone else).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MigrationRunAccepted {
    Started(MigrationStartedView),
    AwaitingApproval(crate::approvals::request::CreatedView),
}

/// Every error body: `{"error": message}`, with what the status needs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorView {
    pub error: String,
    /// Why a credential or request was refused (401, 423, 429, IP blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The permission a 403 needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<String>,
    /// Internal errors: the request id the log has the cause under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// 409 while a job runs: the running job's id and kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

// One-time tokens and secret values are credentials: Debug never shows them.
macro_rules! redacted_debug {
    ($ty:ident, $($field:ident),*) => {
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .finish_non_exhaustive()
            }
        }
    };
}
redacted_debug!(LoginView, token_type, expires_in, session_id);
redacted_debug!(CreatedKeyView, key);
redacted_debug!(SecretValueView, secret);
