//! What the authentication domain stores, and how it is shown.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::clock::{format_opt, format_us};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: String,
    pub email: String,
    /// Argon2id PHC string; `None` for accounts that only use API keys (the
    /// bootstrap admin until a password is set).
    pub password_hash: Option<String>,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub created_at: i64,
    /// Consecutive failed password logins since the last success or lockout.
    pub failed_logins: u32,
    /// Lockouts since the last successful login (the escalation step).
    pub lockouts: u32,
    pub locked_until: Option<i64>,
    pub last_active_at: Option<i64>,
    /// Sessions carry the generation they were issued in; a password change,
    /// reset or disable moves it on, ending every older session for good.
    #[serde(default)]
    pub session_generation: u64,
}

impl User {
    pub fn is_locked(&self, now_us: i64) -> bool {
        self.locked_until.is_some_and(|t| t > now_us)
    }

    /// The API view: never the password hash.
    pub fn view(&self, now_us: i64, last_active_at: Option<i64>) -> UserView {
        UserView {
            id: self.id.clone(),
            email: self.email.clone(),
            roles: self.roles.clone(),
            disabled: self.disabled,
            disabled_reason: self.disabled_reason.clone(),
            locked: self.is_locked(now_us),
            locked_until: format_opt(self.locked_until.filter(|&t| t > now_us)),
            has_password: self.password_hash.is_some(),
            created_at: format_us(self.created_at),
            last_active_at: format_opt(last_active_at.or(self.last_active_at)),
        }
    }
}

/// A user as the API shows it (never the password hash).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub email: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    pub locked: bool,
    pub locked_until: Option<String>,
    pub has_password: bool,
    pub created_at: String,
    pub last_active_at: Option<String>,
}

/// A session as the API shows it (never its token).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub id: String,
    pub user_id: String,
    pub created_at: String,
    pub expires_at: String,
    pub active: bool,
    /// Ended by a password change/reset or a disable (not revoked one by one).
    pub ended_by_credential_change: bool,
    pub revoked_at: Option<String>,
    pub revoked_reason: Option<String>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
}

/// An API key's metadata (never its secret).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// `ara_<id>`: how the key starts.
    pub prefix: String,
    pub created_at: String,
    pub revoked: bool,
    pub revoked_at: Option<String>,
}

/// An IP block as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IpBlockView {
    /// The address or CIDR network.
    pub ip: String,
    pub reason: String,
    pub created_at: String,
    pub expires_at: String,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub revoked_reason: Option<String>,
    pub ip_address: Option<String>,
    pub user_agent: Option<String>,
    /// The user's `session_generation` when the session was issued.
    #[serde(default)]
    pub generation: u64,
}

impl Session {
    /// Whether the session still authenticates, for the user as it is now.
    pub fn is_active(&self, user: &User, now_us: i64) -> bool {
        self.revoked_at.is_none()
            && self.expires_at > now_us
            && self.generation == user.session_generation
            && !user.disabled
    }

    pub fn view(&self, user: &User, now_us: i64) -> SessionView {
        let ended = self.revoked_at.is_none() && self.generation != user.session_generation;
        SessionView {
            id: self.id.clone(),
            user_id: self.user_id.clone(),
            created_at: format_us(self.created_at),
            expires_at: format_us(self.expires_at),
            active: self.is_active(user, now_us),
            ended_by_credential_change: ended,
            revoked_at: format_opt(self.revoked_at),
            revoked_reason: self.revoked_reason.clone(),
            ip_address: self.ip_address.clone(),
            user_agent: self.user_agent.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    /// SHA-256 of the secret part, hex. The key has 256 bits of entropy, so a
    /// fast hash is enough (no dictionary to protect against).
    pub secret_sha256: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKey {
    pub fn prefix(&self) -> String {
        format!("{}{}", super::tokens::API_KEY_PREFIX, self.id)
    }

    pub fn view(&self) -> ApiKeyView {
        ApiKeyView {
            id: self.id.clone(),
            user_id: self.user_id.clone(),
            name: self.name.clone(),
            prefix: self.prefix(),
            created_at: format_us(self.created_at),
            revoked: self.revoked_at.is_some(),
            revoked_at: format_opt(self.revoked_at),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IpBlock {
    pub ip: String,
    pub reason: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
}

impl IpBlock {
    pub fn view(&self) -> IpBlockView {
        IpBlockView {
            ip: self.ip.clone(),
            reason: self.reason.clone(),
            created_at: format_us(self.created_at),
            expires_at: format_us(self.expires_at),
            created_by: self.created_by.clone(),
        }
    }
}

/// Singleton: tokens issued before this instant are refused (sessions/revoke-all).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RevocationEpoch {
    pub revoked_before: i64,
}
