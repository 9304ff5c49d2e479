//! The gate in front of a risky call: it either runs now or becomes an
//! approval request (202).
//!
//! Who runs at once: the `admin` role only. It can already grant itself any
//! permission, so making it wait adds no ceiling, and the runbook's lockdown
//! (`POST /api/admin/sessions/revoke-all` with `$ADMIN_TOKEN`) must act at
//! once; each such call is audited as `approval_gate_skipped` at critical
//! severity so it stands out. Everyone else asks: a holder of the operation's
//! permission or of `approvals.request`, checked here against what the
//! operation would need of them when it runs (the privilege ceiling), so a
//! request that could never run is refused now, not after approvers spent
//! time on it.

use std::sync::Arc;

use serde_json::json;

use super::params::OperationParams;
use super::request::{ApprovalRequest, Status};
use super::service::Requester;
use crate::app::AppState;
use crate::audit::{AuditEvent, Outcome};
use crate::auth::{Principal, RequestMeta};
use crate::error::ServiceError;
use crate::rbac::catalogue::{WILDCARD, is_sensitive};
use crate::rbac::grant::Grant;

/// The role whose calls are never gated.
pub const UNGATED_ROLE: &str = "admin";

/// What the gated call does next.
#[derive(Debug)]
pub enum Gate {
    /// The caller may run it now.
    Run,
    /// It waits for approvers: answer 202 with this request.
    Requested(Box<ApprovalRequest>),
}

/// The `admin` role, or any role granting everything (`*`): what it could
/// grant itself, a gate cannot hold back.
pub fn is_ungated(state: &AppState, p: &Principal) -> bool {
    p.roles.iter().any(|r| r == UNGATED_ROLE)
        || state.rbac.grants_of(&p.roles).iter().any(|g| g == WILDCARD)
}

/// Whether a grant list holds a sensitive permission (or everything).
pub fn is_privileged<S: AsRef<str>>(grants: &[S]) -> bool {
    grants.iter().any(|g| match Grant::parse(g.as_ref()) {
        Grant::All => true,
        Grant::Permission { name, .. } => name == WILDCARD || is_sensitive(name),
    })
}

/// Runs `params` now (the admin) or turns it into an approval request.
pub fn gate(
    state: &Arc<AppState>,
    p: &Principal,
    meta: &RequestMeta,
    params: &OperationParams,
    reason: &str,
) -> Result<Gate, ServiceError> {
    let operation = params.operation();
    if is_ungated(state, p) {
        let event = AuditEvent::new("approval_gate_skipped", p.user_id.clone(), Outcome::Success)
            .ip(meta.ip_string())
            .details(json!({
                "operation": operation.as_str(),
                "risk_level": operation.policy().risk_level.as_str(),
                "params": params.to_value(),
                "why": "the admin role runs gated operations without approval",
                "severity": "critical",
            }));
        state.audit.record(event)?;
        return Ok(Gate::Run);
    }
    let r = request(state, p, meta, params, reason)?;
    Ok(Gate::Requested(Box::new(r)))
}

/// Creates the approval request for `params` after checking that `p` may ask
/// for it and could run it once approved. An auto-approved one (low risk with
/// `APPROVAL_AUTO_APPROVE_LOW`) starts running at once.
pub fn request(
    state: &Arc<AppState>,
    p: &Principal,
    meta: &RequestMeta,
    params: &OperationParams,
    reason: &str,
) -> Result<ApprovalRequest, ServiceError> {
    check_requester(state, p, meta, params)?;
    let r = state.approvals.request(
        &Requester {
            user_id: &p.user_id,
            ip: meta.ip_string(),
        },
        params.operation(),
        params.to_value(),
        reason,
    )?;
    if r.status == Status::Approved {
        super::execute::spawn(state, r.id.clone());
    }
    Ok(r)
}

/// The requester's authority for `params`: the operation's permission or
/// `approvals.request`, plus what the operation itself requires of the
/// actor (grants it hands out must be its own). Checked when asking and again
/// when the approved operation runs.
pub fn check_requester(
    state: &AppState,
    p: &Principal,
    meta: &RequestMeta,
    params: &OperationParams,
) -> Result<(), ServiceError> {
    let operation = params.operation();
    let permission = operation.policy().permission;
    if state.rbac.evaluate(&p.roles, permission).is_none()
        && state.rbac.evaluate(&p.roles, "approvals.request").is_none()
    {
        return Err(ServiceError::Forbidden {
            permission: format!("{permission} or approvals.request (to request {operation})"),
        });
    }
    match params {
        OperationParams::PrivilegedRoleGrant(g) => {
            state.auth.user(&g.user_id)?;
            let grants = state.auth.check_add_role(p, &g.user_id, &g.role, meta)?;
            if !is_privileged(&grants) {
                return Err(ServiceError::BadRequest(format!(
                    "role: {} holds no sensitive permission; assign it directly (POST /api/admin/users/{{id}}/roles)",
                    g.role
                )));
            }
        }
        OperationParams::CustomRoleChange(c) => {
            state
                .auth
                .check_put_role(p, &c.name, &c.permissions, meta)?;
        }
        OperationParams::UserDelete(d) => {
            state.auth.check_delete_user(p, &d.user_id, meta)?;
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_means_a_sensitive_permission_or_everything() {
        assert!(is_privileged(&["*"]));
        assert!(is_privileged(&["self.read", "encryption.rotate"]));
        assert!(is_privileged(&["secrets.read:team-a/"]));
        assert!(!is_privileged(&[
            "self.read",
            "secrets.list",
            "approvals.read"
        ]));
        assert!(!is_privileged::<&str>(&[]));
    }
}
