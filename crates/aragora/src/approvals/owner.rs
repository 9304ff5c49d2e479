//! Gated operations the data dir's owner runs from the CLI rather than the
//! server: `master_key_rotation` needs the new master key in the process's
//! environment, which never passes through the API, so the server never
//! executes its approved requests (`execute::runs_here`). The owner either
//! names the approved request the run executes (`--approval ID`: marked
//! executing, then executed or failed, once) or runs without one, audited as
//! `approval_gate_skipped` at critical severity, as an admin's ungated call
//! is.

use serde_json::json;

use super::catalogue::Operation;
use super::request::Status;
use crate::app::AppState;
use crate::audit::{AuditEvent, Outcome};
use crate::encryption::{MasterRotation, MasterRotationOutcome};
use crate::error::ServiceError;

/// `aragora master-key rotate [--dry-run] [--approval ID]`. `progress(done,
/// total)` after each batch of rewrapped records.
pub fn master_key_rotate(
    state: &AppState,
    opts: MasterRotation,
    actor: &str,
    via: &str,
    progress: &dyn Fn(usize, usize),
) -> Result<MasterRotationOutcome, ServiceError> {
    if opts.dry_run {
        return Ok(state.keyring.rotate_master(actor, &opts, progress)?);
    }
    // A sealed ring cannot be rotated: refuse before consuming an approval.
    state.keyring.ensure_unsealed()?;
    let Some(id) = opts.approval_id.clone() else {
        let operation = Operation::MasterKeyRotation;
        let event =
            AuditEvent::new("approval_gate_skipped", actor, Outcome::Success).details(json!({
                "operation": operation.as_str(),
                "risk_level": operation.policy().risk_level.as_str(),
                "params": {},
                "via": via,
                "why": "the data dir's owner ran `aragora master-key rotate` without --approval",
                "severity": "critical",
            }));
        state.audit.record(event).map_err(ServiceError::from)?;
        return Ok(state.keyring.rotate_master(actor, &opts, progress)?);
    };
    let r = state.approvals.get(&id)?;
    if r.operation != Operation::MasterKeyRotation {
        return Err(ServiceError::BadRequest(format!(
            "approval request {id} is for {}, not master_key_rotation",
            r.operation.as_str()
        )));
    }
    if r.status != Status::Approved {
        return Err(ServiceError::Conflict(format!(
            "approval request {id} is {}, not approved: only an approved master_key_rotation \
             request can be executed (each once)",
            r.status.as_str()
        )));
    }
    let job_id = crate::jobs::new_job_id().map_err(ServiceError::from)?;
    if state.approvals.begin_execution(&id, &job_id)?.is_none() {
        return Err(ServiceError::Conflict(format!(
            "approval request {id} was taken by another run or decided otherwise meanwhile"
        )));
    }
    let result = state.keyring.rotate_master(actor, &opts, progress);
    let outcome = match &result {
        Ok(o) => Ok(serde_json::to_value(o).unwrap_or(serde_json::Value::Null)),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = state
        .approvals
        .finish_execution(&id, &job_id, outcome, false)
    {
        tracing::warn!(approval_id = %id, error = %e, "the approval's execution could not be recorded");
    }
    Ok(result?)
}
