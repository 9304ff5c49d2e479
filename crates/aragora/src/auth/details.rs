//! The `details` of the audit entries this domain writes, one type per action
//! or family. Runbook jq expressions and tests read these field names, so a
//! rename here is a change of the audit format.

use std::collections::BTreeMap;

use serde::Serialize;

/// An action with nothing to add (`user_enabled`, `account_unlocked`, and
/// refusals without a detail).
#[derive(Serialize)]
pub(crate) struct NoDetails {}

/// A change of one account by `update_user_with`: the change's own fields,
/// then the account.
#[derive(Serialize)]
pub(crate) struct UserChange<'a, D> {
    #[serde(flatten)]
    pub change: D,
    pub user_id: &'a str,
    pub email: &'a str,
}

/// The target of `user_created` when the privilege ceiling refuses it.
#[derive(Serialize)]
pub(crate) struct TargetNewUser<'a> {
    pub target_email: &'a str,
    pub target_roles: &'a [String],
}

/// The target of `role_assigned` when the privilege ceiling refuses it.
#[derive(Serialize)]
pub(crate) struct TargetUserRole<'a> {
    pub target_user_id: &'a str,
    pub target_role: &'a str,
}

/// `user_created`.
#[derive(Serialize)]
pub(crate) struct UserCreated<'a> {
    pub user_id: &'a str,
    pub email: &'a str,
    pub roles: &'a [String],
}

/// `role_assigned`, `role_removed` (with `UserChange`).
#[derive(Serialize)]
pub(crate) struct RoleChange<'a> {
    pub role: &'a str,
    pub roles: Vec<String>,
}

/// `user_disabled` (with `UserChange`).
#[derive(Serialize)]
pub(crate) struct Disabled<'a> {
    pub reason: &'a str,
    pub sessions_ended: bool,
    pub api_keys_suspended: bool,
}

/// `password_set` (with `UserChange`).
#[derive(Serialize)]
pub(crate) struct PasswordSet {
    pub sessions_ended: bool,
}

/// `password_changed` (with `UserChange`).
#[derive(Serialize)]
pub(crate) struct PasswordChanged {
    pub other_sessions_ended: bool,
    pub kept_session: Option<String>,
}

/// `account_locked` by `bulk_lock` (with `UserChange`).
#[derive(Serialize)]
pub(crate) struct BulkLocked {
    pub until: String,
    pub by: &'static str,
}

/// `account_locked` by the lockout policy (the actor is the account).
#[derive(Serialize)]
pub(crate) struct PolicyLocked<'a> {
    pub email: &'a str,
    pub until: String,
    pub by: &'static str,
}

/// `admin_bootstrap`.
#[derive(Serialize)]
pub(crate) struct Bootstrapped<'a> {
    pub user_id: &'a str,
    pub email: &'a str,
    pub key_id: &'a str,
}

/// `ip_blocked`.
#[derive(Serialize)]
pub(crate) struct IpBlocked<'a> {
    pub blocked_ip: &'a str,
    pub reason: &'a str,
    pub until: String,
}

/// `ip_unblocked`.
#[derive(Serialize)]
pub(crate) struct IpUnblocked<'a> {
    pub blocked_ip: &'a str,
}

/// `login_success`.
#[derive(Serialize)]
pub(crate) struct LoginSucceeded<'a> {
    pub email: &'a str,
    pub session_id: &'a str,
    pub method: &'static str,
}

/// `api_key_created`.
#[derive(Serialize)]
pub(crate) struct ApiKeyCreated<'a> {
    pub user_id: &'a str,
    pub key_id: &'a str,
    pub name: &'a str,
}

/// `api_keys_revoked`.
#[derive(Serialize)]
pub(crate) struct ApiKeysRevoked<'a> {
    pub user_id: &'a str,
    pub key_ids: &'a [String],
}

/// `sessions_revoked`.
#[derive(Serialize)]
pub(crate) struct SessionsRevoked<'a> {
    pub user_id: &'a str,
    pub session_ids: &'a [String],
    pub reason: &'a str,
}

/// `sessions_revoked_all`.
#[derive(Serialize)]
pub(crate) struct AllSessionsRevoked {
    pub revoked_before: String,
    pub active_sessions: u64,
}

/// What one refused authentication adds to its `auth_failure` entry (beside
/// reason, email and count). The fields are fixed or stored values, so an
/// outsider cannot grow an entry.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum FailureDetail {
    None {},
    UnknownUser {
        unknown_user: bool,
    },
    Locked {
        locked_until: String,
    },
    BadPassword {
        failed_logins: u32,
        locked_until: Option<String>,
    },
    Why {
        why: &'static str,
    },
    Credential {
        credential: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
    Session {
        session_id: String,
    },
}

/// An `auth_failure` entry: the first refusal of its key in a window
/// (`count: 1`, with its detail) or the summary of the later ones.
#[derive(Serialize)]
pub(crate) struct AuthFailure<'a> {
    pub reason: &'static str,
    pub email: Option<&'a str>,
    pub count: u64,
    #[serde(flatten)]
    pub span: Option<Aggregated>,
    #[serde(flatten)]
    pub detail: FailureDetail,
}

/// When the refusals a summary counts happened.
#[derive(Serialize)]
pub(crate) struct Aggregated {
    pub aggregated: bool,
    pub first_at: String,
    pub last_at: String,
}

/// The summary of refusals beyond the keys tracked in one window.
#[derive(Serialize)]
pub(crate) struct ManySources {
    pub reason: &'static str,
    pub aggregated: bool,
    pub count: u64,
    pub reasons: BTreeMap<&'static str, u64>,
    pub first_at: String,
    pub last_at: String,
    pub note: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, to_value};

    #[test]
    fn flattened_details_keep_their_field_names() {
        let v = to_value(UserChange {
            change: NoDetails {},
            user_id: "usr_1",
            email: "a@x",
        })
        .expect("json");
        assert_eq!(v, json!({"user_id": "usr_1", "email": "a@x"}));
        let v = to_value(AuthFailure {
            reason: "bad_password",
            email: None,
            count: 1,
            span: None,
            detail: FailureDetail::BadPassword {
                failed_logins: 2,
                locked_until: None,
            },
        })
        .expect("json");
        assert_eq!(
            v,
            json!({"reason": "bad_password", "email": null, "count": 1, "failed_logins": 2, "locked_until": null})
        );
        let v = to_value(AuthFailure {
            reason: "revoked",
            email: Some("a@x"),
            count: 3,
            span: Some(Aggregated {
                aggregated: true,
                first_at: "t1".into(),
                last_at: "t2".into(),
            }),
            detail: FailureDetail::None {},
        })
        .expect("json");
        assert_eq!(
            v,
            json!({"reason": "revoked", "email": "a@x", "count": 3, "aggregated": true, "first_at": "t1", "last_at": "t2"})
        );
        let v = to_value(FailureDetail::Credential {
            credential: "api_key",
            key_id: None,
        })
        .expect("json");
        assert_eq!(v, json!({"credential": "api_key"}));
    }
}
