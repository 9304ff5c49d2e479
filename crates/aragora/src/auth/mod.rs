//! Authentication and account administration: users (Argon2id passwords),
//! server-side sessions behind JWT access tokens, API keys, brute-force
//! defences. Every security event is audited; changes are written in the same
//! atomic batch as their audit entry.

pub mod api_keys;
mod ceiling;
pub mod defence;
mod defences;
pub mod delete;
mod details;
pub mod failures;
pub mod jwt;
pub mod model;
pub mod password;
pub mod recovery;
pub mod roles;
pub mod sessions;
pub mod tokens;
pub mod users;

use std::net::IpAddr;
use std::sync::Arc;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::rbac::Rbac;
use crate::store::{Store, StoreError};
use api_keys::ApiKeys;
use defences::Defences;
use jwt::JwtKeys;
use model::User;
use sessions::Sessions;
use users::Users;

pub use delete::DeletedUser;

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    Session {
        session_id: String,
    },
    ApiKey {
        key_id: String,
    },
    /// The requester acting through an approved request, executed later by
    /// the server: no bearer credential of the user's is involved, so there is
    /// no session or key to keep, end or revoke on its behalf.
    Approval {
        approval_id: String,
    },
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Principal {
    pub user_id: String,
    pub email: String,
    pub roles: Vec<String>,
    pub credential: Credential,
}

impl Principal {
    /// `user` acting through `credential`.
    pub(crate) fn of(user: model::User, credential: Credential) -> Self {
        Self {
            user_id: user.id,
            email: user.email,
            roles: user.roles,
            credential,
        }
    }
}

/// The request context every audited action carries.
#[derive(Clone, Debug, Default)]
pub struct RequestMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl RequestMeta {
    pub fn ip_string(&self) -> Option<String> {
        self.ip.map(|i| i.to_string())
    }
}

/// The one answer to every failed login, whatever the reason (unknown,
/// locked or disabled account, wrong password): the difference shows only in
/// the audit log and the metrics, never to the caller.
pub const INVALID_LOGIN: &str = "invalid email or password";
/// Login request bodies larger than this are refused before parsing.
pub const MAX_LOGIN_BODY_BYTES: usize = 4096;

/// Compare-and-set attempts before a change reports a conflict.
pub(crate) const CAS_RETRIES: usize = 8;

/// The authentication domain: each concern owns its records (users,
/// sessions, API keys) or state (defences); the service composes them with
/// the audit log (every change is written with its entry) and RBAC.
#[derive(Debug)]
pub struct AuthService {
    /// For reads that span owners in one snapshot (authentication) and
    /// writes that span them in one batch (through the audit log).
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    rbac: Arc<Rbac>,
    metrics: Metrics,
    users: Users,
    sessions: Sessions,
    api_keys: ApiKeys,
    defences: Defences,
    /// REDIS_URL's link (the shared login limit), for the stats endpoint.
    redis: Option<Arc<crate::redis_link::RedisLink>>,
}

impl AuthService {
    pub fn new(
        config: &Config,
        jwt_secret: &str,
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        rbac: Arc<Rbac>,
        metrics: Metrics,
        redis: Option<Arc<crate::redis_link::RedisLink>>,
    ) -> Result<Self, StoreError> {
        let ttl = i64::try_from(config.token_ttl.as_secs()).unwrap_or(3600);
        let jwt = JwtKeys::new(
            jwt_secret,
            config.jwt_secret_previous.as_ref().map(|s| s.expose()),
            ttl,
        );
        Ok(Self {
            defences: Defences::load(config, store.as_ref(), redis.clone())?,
            redis,
            users: Users::new(store.clone()),
            sessions: Sessions::new(store.clone(), jwt),
            api_keys: ApiKeys::new(store.clone()),
            store,
            audit,
            rbac,
            metrics,
        })
    }

    /// The Redis link's state (`None` without REDIS_URL).
    pub fn redis_status(&self) -> Option<crate::redis_link::RedisStatus> {
        self.redis.as_ref().map(|l| l.status())
    }

    pub(crate) fn user_by_email(&self, email: &str) -> Result<Option<(u64, User)>, ServiceError> {
        self.users.by_email(email)
    }

    /// The user record and its version; 404 when there is none.
    pub(crate) fn user(&self, id: &str) -> Result<(u64, User), ServiceError> {
        self.users.get(id)
    }
}

#[cfg(test)]
mod tests;
