//! Privilege ceilings: a caller hands out only what it holds, and acts on
//! accounts only when they hold no more than it does; the last enabled admin
//! stays. Refusals are 403 naming the missing grant and audited as
//! `permission_denied` with the target.

use super::model::User;
use super::{AuthService, Principal, RequestMeta};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::rbac::catalogue::{WILDCARD, is_sensitive};
use crate::rbac::grant::first_not_included;
use crate::rbac::roles_label;
use crate::store::WriteOp;
use serde::Serialize;

/// `permission_denied` by the privilege ceiling, with what was targeted.
#[derive(Serialize)]
struct CeilingDenied<'a, T> {
    permission: &'a str,
    role: &'a str,
    sensitive: bool,
    reason: &'static str,
    action: &'a str,
    #[serde(flatten)]
    target: T,
}

/// The account an action targeted.
#[derive(Serialize)]
pub(crate) struct TargetUser<'a> {
    pub target_user_id: &'a str,
    pub target_email: &'a str,
}

/// The role an action targeted.
#[derive(Serialize)]
pub(crate) struct TargetRole<'a> {
    pub target_role: &'a str,
}

impl AuthService {
    /// 403 (audited) unless the actor's grants include every one of `wanted`.
    pub(crate) fn require_grants<'w>(
        &self,
        actor: &Principal,
        wanted: impl IntoIterator<Item = &'w str>,
        action: &str,
        target: impl Serialize,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        let held = self.rbac.grants_of(&actor.roles);
        match first_not_included(&held, wanted) {
            None => Ok(()),
            Some(missing) => Err(self.ceiling_denied(actor, missing, action, target, meta)),
        }
    }

    /// 403 (audited) unless every grant `target` holds is included in the
    /// actor's: nobody resets the password of, disables, or mints keys for an
    /// account more powerful than itself.
    pub(crate) fn require_ceiling_over(
        &self,
        actor: &Principal,
        target: &User,
        action: &str,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        if actor.user_id == target.id {
            return Ok(());
        }
        let theirs = self.rbac.grants_of(&target.roles);
        self.require_grants(
            actor,
            theirs.iter().map(String::as_str),
            action,
            TargetUser {
                target_user_id: &target.id,
                target_email: &target.email,
            },
            meta,
        )
    }

    fn ceiling_denied(
        &self,
        actor: &Principal,
        missing: &str,
        action: &str,
        target: impl Serialize,
        meta: &RequestMeta,
    ) -> ServiceError {
        let details = CeilingDenied {
            permission: missing,
            role: &roles_label(&actor.roles),
            sensitive: missing == WILDCARD
                || is_sensitive(missing.split(':').next().unwrap_or(missing)),
            reason: "privilege_ceiling",
            action,
            target,
        };
        let event = AuditEvent::new("permission_denied", actor.user_id.clone(), Outcome::Denied)
            .ip(meta.ip_string())
            .details(details);
        if let Err(e) = self.audit.record(event) {
            tracing::error!(error = %e, "permission_denied could not be audited");
        }
        self.metrics
            .rbac_denied
            .with_label_values(&[
                crate::metrics::permission_label(missing),
                &crate::metrics::role_label(&actor.roles),
            ])
            .inc();
        let ip = meta.ip_string();
        tracing::warn!(
            reason = "privilege_ceiling",
            permission = %missing,
            action = %action,
            ip = %ip.as_deref().unwrap_or("-"),
            actor = %actor.user_id,
            "permission_denied"
        );
        ServiceError::Forbidden {
            permission: missing.to_string(),
        }
    }

    /// Whether the user holds `*` (an admin, by built-in or custom role).
    pub(crate) fn is_admin(&self, user: &User) -> bool {
        self.rbac
            .grants_of(&user.roles)
            .iter()
            .any(|g| g == WILDCARD)
    }

    /// A write that fails if another enabled, unlocked admin changes before it
    /// commits: added to a change that removes `except`'s ability to act as an
    /// admin, it keeps two such changes racing on the last two admins from both
    /// succeeding. `Conflict` (409) when no other admin can act.
    pub(crate) fn keep_another_admin(
        &self,
        except: &User,
        what: &str,
    ) -> Result<WriteOp, ServiceError> {
        self.keep_an_admin(
            |u| u.id != except.id && self.is_admin(u),
            || {
                format!(
                    "refusing to {what}: {} is the last enabled admin (enable or create another admin first; `aragora admin recover` is the break-glass path)",
                    except.email
                )
            },
        )
    }

    /// Like `keep_another_admin`, for taking `*` out of a custom role: an
    /// admin must remain that holds `*` through another role.
    pub(crate) fn keep_admin_without_role(&self, role: &str) -> Result<WriteOp, ServiceError> {
        self.keep_an_admin(
            |u| {
                u.roles.iter().any(|r| {
                    r != role
                        && self
                            .rbac
                            .role_grants(r)
                            .is_some_and(|g| g.iter().any(|p| p == WILDCARD))
                })
            },
            || {
                format!(
                    "refusing to take * out of role {role}: its holders include the last enabled admin (make another account admin first)"
                )
            },
        )
    }

    /// The guard write for the first enabled, unlocked user that `stays_admin`
    /// accepts: its unchanged record rewritten at its version, so the batch
    /// fails if that admin changes meanwhile. `Conflict(refusal())` when none.
    fn keep_an_admin(
        &self,
        stays_admin: impl Fn(&User) -> bool,
        refusal: impl FnOnce() -> String,
    ) -> Result<WriteOp, ServiceError> {
        let now = now_us();
        let mut other: Option<(u64, User)> = None;
        self.users.for_each(|_, version, u| {
            if other.is_none() && !u.disabled && !u.is_locked(now) && stays_admin(&u) {
                other = Some((version, u));
            }
            Ok(())
        })?;
        match other {
            Some((version, u)) => super::users::put_user(&u, version),
            None => Err(ServiceError::Conflict(refusal())),
        }
    }
}
