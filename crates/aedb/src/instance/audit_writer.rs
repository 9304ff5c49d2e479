//! The audit writer: the `authz_audit` / `assertion_audit` rows for denials,
//! GlobalAdmin use, maintenance operations, failed assertions and grants, and
//! appending rows that are not part of a caller's commit as a commit of their own.
//! Row text is what operators and `aedb check` read: keep it stable.

use crate::audit::{AuditEvent, chain_rows, now_unix};
use crate::authz::{CallerContext, Permission};
use crate::error::AedbError;
use crate::record::{DdlOperation, WalRecord};

use super::AedbInstance;
use super::sequencer::CommitGuard;

/// The actor an anonymous (`Dev`) call is recorded as.
const ANONYMOUS: &str = "anonymous";

/// The actor recorded for `caller` (anonymous calls have none).
pub(super) fn caller_name(caller: Option<&CallerContext>) -> &str {
    caller.map_or(ANONYMOUS, |c| c.caller_id())
}

/// The one-time bootstrap of the first GlobalAdmin.
pub(super) fn bootstrap(admin: &str) -> AuditEvent {
    AuditEvent::Authz {
        actor: "bootstrap".into(),
        action: "bootstrap".into(),
        permission: Permission::GlobalAdmin.to_string(),
        target: admin.to_string(),
        delegable: true,
        outcome: "applied".into(),
    }
}

/// An operation allowed only because `caller` is a GlobalAdmin.
pub(super) fn global_admin_use(
    caller: &CallerContext,
    need: &Permission,
    operation: &str,
) -> AuditEvent {
    AuditEvent::Authz {
        actor: caller.caller_id().to_string(),
        action: "global_admin_use".into(),
        permission: need.to_string(),
        target: operation.to_string(),
        delegable: false,
        outcome: "allowed".into(),
    }
}

/// A maintenance operation (`Backup`, `Checkpoint`) allowed by a grant.
pub(super) fn maintenance_allowed(
    caller: &CallerContext,
    need: &Permission,
    operation: &str,
    target: &str,
) -> AuditEvent {
    AuditEvent::Authz {
        actor: caller.caller_id().to_string(),
        action: operation.to_string(),
        permission: need.to_string(),
        target: target.to_string(),
        delegable: false,
        outcome: "allowed".into(),
    }
}

/// A permission denial.
pub(super) fn permission_denied(
    caller: &CallerContext,
    project: &str,
    need: &Permission,
) -> AuditEvent {
    AuditEvent::Assertion {
        actor: caller.caller_id().to_string(),
        project: project.to_string(),
        kind: "permission_denied".into(),
        detail: format!("operation needs {need}"),
        expected: need.to_string(),
        actual: "not granted".into(),
    }
}

/// What a failed read assertion of a transaction is recorded as. `actual` must
/// already be redacted: audit rows are readable by every `AuditRead` holder.
pub(super) struct FailedAssertion<'a> {
    pub(super) actor: &'a str,
    pub(super) project: &'a str,
    pub(super) index: usize,
    pub(super) snapshot_seq: u64,
    pub(super) expected: &'a str,
    pub(super) actual: String,
}

pub(super) fn assertion_failed(f: FailedAssertion<'_>) -> AuditEvent {
    AuditEvent::Assertion {
        actor: f.actor.to_string(),
        project: f.project.to_string(),
        kind: "assertion_failed".into(),
        detail: format!(
            "assertion {} of a transaction at snapshot {}",
            f.index, f.snapshot_seq
        ),
        expected: f.expected.to_string(),
        actual: f.actual,
    }
}

/// The `authz_audit` row a grant, revoke or ownership change produces.
pub(super) fn authz_event(actor: &str, op: &DdlOperation) -> Option<AuditEvent> {
    let (action, permission, target, delegable) = match op {
        DdlOperation::GrantPermission {
            grantee,
            permission,
            delegable,
        } => ("grant", permission.to_string(), grantee.clone(), *delegable),
        DdlOperation::RevokePermission {
            grantee,
            permission,
        } => ("revoke", permission.to_string(), grantee.clone(), false),
        DdlOperation::TransferOwnership { project, new_owner } => (
            "transfer_ownership",
            format!("owner of {project}"),
            new_owner.clone(),
            false,
        ),
        _ => return None,
    };
    Some(AuditEvent::Authz {
        actor: actor.to_string(),
        action: action.into(),
        permission,
        target,
        delegable,
        outcome: "applied".into(),
    })
}

impl<M> AedbInstance<M> {
    /// Appends audit rows as their own commit (commit lock held), after every
    /// reserved commit has published: rows chain from the audit tables' tails,
    /// which are final only then. Not waited for: the flusher makes it durable
    /// within the batch interval.
    pub(super) fn write_audit_locked(
        &self,
        cs: &mut CommitGuard<'_>,
        events: &[AuditEvent],
    ) -> Result<(), AedbError> {
        cs.drain();
        let seq = cs.state().seq + 1;
        let record = WalRecord::Audit {
            rows: chain_rows(cs.state(), events, seq, now_unix())?,
        };
        self.commit_serial(cs, &record, seq)
    }
}
