//! Custom roles: stored, audited, and applied to the RBAC engine (which drops
//! every cached decision) before the call returns.

use serde::Serialize;

use super::ceiling::TargetRole;
use super::{AuthService, Principal, RequestMeta};
use crate::audit::{AuditEvent, Outcome};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::rbac::CustomRole;
use crate::rbac::catalogue::{WILDCARD, builtin};
use crate::rbac::grant;
use crate::store::{Collection, Expect, WriteOp};

/// `role_updated`.
#[derive(Serialize)]
struct RoleUpdated<'a> {
    role: &'a str,
    permissions: &'a [String],
}

/// `role_deleted`.
#[derive(Serialize)]
struct RoleDeleted<'a> {
    role: &'a str,
}

const MAX_ROLE_NAME: usize = 64;
/// Entries one custom role may list.
const MAX_ROLE_GRANTS: usize = 200;

impl AuthService {
    /// Every refusal `put_role` would give, without writing (the approval
    /// gate checks a `custom_role_change` request with it when it is made).
    /// Returns the permissions normalized (sorted, deduplicated) and the
    /// role's current grants.
    pub fn check_put_role(
        &self,
        actor: &Principal,
        name: &str,
        permissions: &[String],
        meta: &RequestMeta,
    ) -> Result<(Vec<String>, Vec<String>), ServiceError> {
        let valid_name = !name.is_empty()
            && name.len() <= MAX_ROLE_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid_name {
            return Err(ServiceError::BadRequest(format!(
                "name: {name:?} must be 1 to {MAX_ROLE_NAME} of a-z, 0-9, _ and -"
            )));
        }
        if builtin(name).is_some() {
            return Err(ServiceError::Conflict(format!(
                "{name} is a built-in role and cannot be redefined"
            )));
        }
        if permissions.len() > MAX_ROLE_GRANTS {
            return Err(ServiceError::BadRequest(format!(
                "permissions: at most {MAX_ROLE_GRANTS} entries"
            )));
        }
        for p in permissions {
            grant::validate(p)
                .map_err(|e| ServiceError::BadRequest(format!("permissions: {e}")))?;
        }
        let mut permissions = permissions.to_vec();
        permissions.sort();
        permissions.dedup();
        // The caller hands out only what it holds, and reshapes only roles
        // within its own reach (narrowing a more powerful role is a way to
        // lock its holders out).
        let existing = self.rbac.role_grants(name).unwrap_or_default();
        self.require_grants(
            actor,
            permissions
                .iter()
                .chain(existing.iter())
                .map(String::as_str),
            "role_updated",
            TargetRole { target_role: name },
            meta,
        )?;
        if existing.iter().any(|g| g == WILDCARD) && !permissions.iter().any(|g| g == WILDCARD) {
            self.keep_admin_without_role(name)?;
        }
        Ok((permissions, existing))
    }

    pub fn put_role(
        &self,
        actor: &Principal,
        name: &str,
        description: &str,
        permissions: Vec<String>,
        meta: &RequestMeta,
    ) -> Result<CustomRole, ServiceError> {
        let (permissions, existing) = self.check_put_role(actor, name, &permissions, meta)?;
        let mut ops = Vec::new();
        // Taking `*` out of a role must leave an admin who does not hold it
        // through this role (the last-admin rule, as for disable and demote).
        if existing.iter().any(|g| g == WILDCARD) && !permissions.iter().any(|g| g == WILDCARD) {
            ops.push(self.keep_admin_without_role(name)?);
        }
        let role = CustomRole {
            name: name.to_string(),
            description: description.chars().take(500).collect(),
            permissions,
            created_at: now_us(),
            created_by: actor.user_id.clone(),
        };
        let event = AuditEvent::new("role_updated", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(RoleUpdated {
                role: name,
                permissions: &role.permissions,
            });
        ops.insert(
            0,
            WriteOp::put_json(Collection::Roles, name, &role, Expect::Any)?,
        );
        self.audit.record_with(event, ops)?;
        self.rbac.apply_role(name, Some(role.clone()));
        Ok(role)
    }

    pub fn delete_role(
        &self,
        actor: &Principal,
        name: &str,
        meta: &RequestMeta,
    ) -> Result<(), ServiceError> {
        if builtin(name).is_some() {
            return Err(ServiceError::Conflict(format!("{name} is a built-in role")));
        }
        let Some(existing) = self.rbac.role_grants(name) else {
            return Err(ServiceError::NotFound(format!("no custom role {name}")));
        };
        self.require_grants(
            actor,
            existing.iter().map(String::as_str),
            "role_deleted",
            TargetRole { target_role: name },
            meta,
        )?;
        let mut holders = Vec::new();
        self.users.for_each(|_, _, u| {
            if u.roles.iter().any(|r| r == name) {
                holders.push(u.id);
            }
            Ok(())
        })?;
        if !holders.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "role {name} is assigned to {} user(s) ({}); remove it from them first",
                holders.len(),
                holders
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let event = AuditEvent::new("role_deleted", actor.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(RoleDeleted { role: name });
        self.audit.record_with(
            event,
            vec![WriteOp::delete(Collection::Roles, name, Expect::Any)],
        )?;
        self.rbac.apply_role(name, None);
        Ok(())
    }
}
