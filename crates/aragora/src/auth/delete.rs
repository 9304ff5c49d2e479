//! Deleting an account: the user record and its email go (the email may be
//! used again by a new account, which gets a new id), every live session of it
//! is revoked and every API key of it revoked, in one atomic write with the
//! `user_deleted` audit entry. Sessions and keys stay as revoked records, so
//! what the account held remains traceable from the audit log.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::model::User;
use super::{AuthService, CAS_RETRIES, Principal, RequestMeta};
use crate::audit::{AuditEvent, Outcome, RecordError};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::store::{Collection, Expect, WriteOp};

/// The audit action, and the reason written on what the deletion revoked.
pub const ACTION: &str = "user_deleted";

/// What `AuthService::delete_user` did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeletedUser {
    pub id: String,
    pub email: String,
    /// Sessions that were live and are now revoked.
    pub sessions_revoked: u64,
    /// API keys that were unrevoked and are now revoked.
    pub api_keys_revoked: u64,
}

/// The `user_deleted` entry.
#[derive(Serialize)]
struct Deleted<'a> {
    user_id: &'a str,
    email: &'a str,
    roles: &'a [String],
    sessions_revoked: u64,
    api_keys_revoked: u64,
}

/// A deletion that passed every check, against the record at `version`.
struct Plan {
    version: u64,
    user: User,
    /// Keeps another able admin in place when the target is one.
    admin_guard: Option<WriteOp>,
}

impl AuthService {
    /// Every refusal of `delete_user`, without writing anything: 409 for
    /// deleting oneself or the last enabled admin, 403 (audited as
    /// `permission_denied`, like every privilege-ceiling refusal) when the
    /// target holds a grant the actor lacks, 404 for an unknown user. For a
    /// gate that validates a request when it is made; `delete_user` checks
    /// again when it runs.
    pub fn check_delete_user(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        self.plan_delete(actor, user_id, meta).map(|_| ())
    }

    /// Deletes the account `user_id` (see the module documentation); refused
    /// as `check_delete_user` says.
    pub fn delete_user(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<DeletedUser, ServiceError> {
        for _ in 0..CAS_RETRIES {
            let plan = self.plan_delete(actor, user_id, meta)?;
            match self.try_delete(actor, plan, meta)? {
                Some(done) => {
                    self.rbac.invalidate_user(user_id);
                    self.users.forget_activity(user_id);
                    tracing::warn!(
                        user_id,
                        email = %done.email,
                        by = %actor.user_id,
                        sessions_revoked = done.sessions_revoked,
                        api_keys_revoked = done.api_keys_revoked,
                        "user deleted"
                    );
                    return Ok(done);
                }
                None => continue,
            }
        }
        Err(ServiceError::Conflict(format!(
            "user {user_id} is changing concurrently; retry"
        )))
    }

    fn plan_delete(
        &self,
        actor: &Principal,
        user_id: &str,
        meta: &RequestMeta,
    ) -> Result<Plan, ServiceError> {
        if actor.user_id == user_id {
            return Err(ServiceError::Conflict(
                "refusing to delete your own account (ask another admin)".into(),
            ));
        }
        let (version, user) = self.user(user_id)?;
        self.require_ceiling_over(actor, &user, ACTION, meta)?;
        let admin_guard = if !user.disabled && self.is_admin(&user) {
            Some(self.keep_another_admin(&user, "delete this account")?)
        } else {
            None
        };
        Ok(Plan {
            version,
            user,
            admin_guard,
        })
    }

    /// One attempt: `None` when a record moved meanwhile (plan again).
    fn try_delete(
        &self,
        actor: &Principal,
        plan: Plan,
        meta: &RequestMeta,
    ) -> Result<Option<DeletedUser>, ServiceError> {
        let Plan {
            version,
            user,
            admin_guard,
        } = plan;
        let now = now_us();
        let mut ops = vec![WriteOp::delete(
            Collection::Users,
            user.id.clone(),
            Expect::Version(version),
        )];
        // The email index entry goes only if it still names this account.
        if let Some((v, id)) = self.users.email_owner(&user.email)?
            && id == user.id
        {
            ops.push(WriteOp::delete(
                Collection::UserEmails,
                user.email.clone(),
                Expect::Version(v),
            ));
        }
        let (sessions, session_ops) = self
            .sessions
            .revoke_ops(&user.id, None, true, ACTION, now)?;
        let (keys, key_ops) = self.api_keys.revoke_ops(&user.id, None, now)?;
        ops.extend(session_ops);
        ops.extend(key_ops);
        let sessions_revoked = sessions.len() as u64;
        let api_keys_revoked = keys.len() as u64;
        ops.extend(admin_guard);
        let event = AuditEvent::new(ACTION, actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(Deleted {
                user_id: &user.id,
                email: &user.email,
                roles: &user.roles,
                sessions_revoked,
                api_keys_revoked,
            });
        match self.audit.record_with(event, ops) {
            Ok(_) => Ok(Some(DeletedUser {
                id: user.id,
                email: user.email,
                sessions_revoked,
                api_keys_revoked,
            })),
            Err(RecordError::Ops(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
