//! Runs approved requests, exactly once.
//!
//! # The steps, each durable before the next
//!
//! 1. `approved` → `executing` under a fresh job id, by compare-and-set on the
//!    request: of two runners (a concurrent approval, the periodic pass, a
//!    replica) exactly one wins; the others see `executing` and stop.
//! 2. The job record (`Collection::Jobs`, kind `approved_operation`) is written
//!    `running` before the operation starts.
//! 3. The requester's authority is checked again as the account is now (a
//!    requester disabled, deleted or stripped of the permission meanwhile gets
//!    `refused`, nothing runs), then the operation runs as the requester.
//! 4. The job record, then the request, record the outcome (`executed` with
//!    the result, or `failed` / `refused` with why).
//!
//! # After a crash
//!
//! A request left `approved` (crash before step 1) is run by the next pass. A
//! request left `executing` is taken over once its lease ran out (its runner
//! is gone: in one process, at once after a restart, because this process
//! never holds a lease it did not take): no job record means step 2 never
//! happened, so it runs; a `completed`/`failed` job means only step 4 was lost,
//! so its outcome is copied, not run again; a `running` job means the
//! operation may or may not have taken effect: operations that are idempotent
//! (role grant, role change, user delete, revoke-all, key cleanup, IP
//! unblock, and a
//! migration, which resumes from its own cursor) run again, a key rotation
//! (not idempotent: a second run makes a second key) is marked `failed` with
//! a message saying to check the key ring, never run twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use serde_json::{Value, json};

use super::catalogue::Operation;
use super::gate::check_requester;
use super::params::OperationParams;
use super::request::{ApprovalRequest, Status};
use crate::app::AppState;
use crate::auth::RequestMeta;
use crate::config::FaultPoint;
use crate::error::ServiceError;
use crate::jobs::{JobRecord, JobState, new_job_id};

/// Approved operations run at once in one process; more wait for the next pass.
pub const MAX_CONCURRENT_EXECUTIONS: usize = 8;

/// The requests this process is running now (so the periodic pass never takes
/// over its own work, whatever the lease says).
#[derive(Debug)]
pub struct Executor {
    running: Mutex<HashSet<String>>,
    /// No other process opens the store (the embedded store's directory
    /// lock): on the first pass after boot every `executing` request is a dead
    /// runner's, lease or not.
    exclusive_store: bool,
    first_pass_done: AtomicBool,
}

/// How one run ended.
enum RunEnd {
    Done(Value),
    Failed(String),
    /// The requester's authority no longer covers it.
    Refused(String),
}

impl Executor {
    pub fn new(exclusive_store: bool) -> Self {
        Self {
            running: Mutex::new(HashSet::new()),
            exclusive_store,
            first_pass_done: AtomicBool::new(false),
        }
    }

    /// True on the first pass after boot on an exclusive store.
    fn boot_takeover(&self) -> bool {
        self.exclusive_store && !self.first_pass_done.load(Ordering::Acquire)
    }

    /// Reserves `id` for this process; false if it already runs here or the
    /// concurrency bound is reached.
    fn reserve(&self, id: &str) -> bool {
        let mut running = self.running.lock();
        if running.len() >= MAX_CONCURRENT_EXECUTIONS || running.contains(id) {
            return false;
        }
        running.insert(id.to_string())
    }

    fn release(&self, id: &str) {
        self.running.lock().remove(id);
    }

    fn is_running_here(&self, id: &str) -> bool {
        self.running.lock().contains(id)
    }
}

/// One pass over every request waiting to run or running: starts the
/// approved ones and takes over the abandoned ones, each on its own thread.
/// Called after a decision that may approve and from the periodic tick.
pub fn run_due(state: &Arc<AppState>) {
    let due = match state.approvals.awaiting_execution() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "approved requests could not be listed; retrying on the next pass");
            return;
        }
    };
    let boot = state.executor.boot_takeover();
    for r in due {
        if !runs_here(r.operation) {
            continue;
        }
        if state.executor.is_running_here(&r.id) {
            continue;
        }
        let abandoned = r.status == Status::Executing
            && (boot
                || r.execution
                    .as_ref()
                    .is_some_and(|e| e.lease_until <= crate::clock::now_us()));
        if r.status == Status::Approved || abandoned {
            tracing::info!(approval_id = %r.id, status = r.status.as_str(), boot, "running an approved request left waiting");
            spawn_with(state, r.id.clone(), boot);
        }
    }
    state
        .executor
        .first_pass_done
        .store(true, Ordering::Release);
}

/// Whether the server runs this operation once approved. A master-key
/// rotation is run offline by the owner with the new key (which never passes
/// through the API); its approval waits for that step.
fn runs_here(op: Operation) -> bool {
    op != Operation::MasterKeyRotation
}

/// Operations that use the data keys (and so cannot run on a sealed ring).
fn needs_data_keys(op: Operation) -> bool {
    matches!(
        op,
        Operation::KeyRotation
            | Operation::KeyCleanup
            | Operation::MigrationRun
            | Operation::SecretExport
    )
}

/// Runs (or takes over) one request on a new thread.
pub fn spawn(state: &Arc<AppState>, id: String) {
    spawn_with(state, id, false);
}

fn spawn_with(state: &Arc<AppState>, id: String, known_dead: bool) {
    if !state.executor.reserve(&id) {
        return;
    }
    let runner = state.clone();
    let run_id = id.clone();
    let spawned = std::thread::Builder::new()
        .name("approval-exec".into())
        .spawn(move || {
            if let Err(e) = execute(&runner, &run_id, known_dead) {
                tracing::warn!(approval_id = %run_id, error = %e, "approved operation not run; retrying on the next pass");
            }
            runner.executor.release(&run_id);
        });
    if let Err(e) = spawned {
        // Free the slot: the next pass tries again.
        state.executor.release(&id);
        tracing::error!(approval_id = %id, error = %e, "could not start a thread for an approved operation");
    }
}

/// Runs one request in the calling thread if it is approved (or abandoned
/// while executing); returns the request as it ended, or `None` when there was
/// nothing for this runner to do.
pub fn execute(
    state: &AppState,
    id: &str,
    known_dead: bool,
) -> Result<Option<ApprovalRequest>, ServiceError> {
    let r = state.approvals.get(id)?;
    if !runs_here(r.operation) {
        return Ok(None);
    }
    // A sealed key ring would fail these; the request stays approved (or
    // executing, for a takeover) and the first pass after `aragora unseal`
    // runs it, instead of ending it `failed` for a condition an operator fixes.
    if needs_data_keys(r.operation)
        && let Some(sealed) = state.keyring.sealed()
    {
        tracing::warn!(
            approval_id = %id,
            operation = r.operation.as_str(),
            reason = %sealed.message,
            "approved operation waits: the key ring is sealed"
        );
        return Ok(None);
    }
    state.config.faults.at(FaultPoint::ApprovalBeforeExecution);
    let job_id = new_job_id().map_err(ServiceError::from)?;
    let (r, previous) = match r.status {
        Status::Approved => match state.approvals.begin_execution(id, &job_id)? {
            Some(r) => (r, None),
            None => return Ok(None),
        },
        Status::Executing => match state
            .approvals
            .take_over_execution(id, &job_id, known_dead)?
        {
            Some((r, previous)) => (r, Some(previous)),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    if let Some(previous) = previous {
        match state.jobs.find(&previous).map_err(ServiceError::from)? {
            Some(job) if job.state == JobState::Completed => {
                let result = job.result.unwrap_or(Value::Null);
                return finish(state, &r, &job_id, RunEnd::Done(result));
            }
            Some(job) if job.state == JobState::Failed => {
                let why = job.error.unwrap_or_else(|| "failed".into());
                return finish(state, &r, &job_id, RunEnd::Failed(why));
            }
            Some(_) if r.operation == Operation::KeyRotation => {
                let why = format!(
                    "interrupted: the process running it (job {previous}) stopped; a key may or may not have been added — check GET /api/security/encryption/keys before requesting again"
                );
                return finish(state, &r, &job_id, RunEnd::Failed(why));
            }
            // Not started (no record) or idempotent: run it.
            _ => {}
        }
    }
    let job = state
        .jobs
        .start_approved(&job_id, id, r.operation.as_str(), &r.requester_id)
        .map_err(ServiceError::from)?;
    let end = run(state, &r);
    let outcome = match &end {
        RunEnd::Done(v) => Ok(v.clone()),
        RunEnd::Failed(e) | RunEnd::Refused(e) => Err(e.clone()),
    };
    if let Err(e) = state.jobs.finish_approved(job, &outcome) {
        tracing::warn!(approval_id = %id, error = %e, "job outcome not recorded");
    }
    state.config.faults.at(FaultPoint::ApprovalAfterJob);
    finish(state, &r, &job_id, end)
}

fn finish(
    state: &AppState,
    r: &ApprovalRequest,
    job_id: &str,
    end: RunEnd,
) -> Result<Option<ApprovalRequest>, ServiceError> {
    let (outcome, refused) = match end {
        RunEnd::Done(v) => (Ok(v), false),
        RunEnd::Failed(e) => (Err(e), false),
        RunEnd::Refused(e) => (Err(e), true),
    };
    let done = state
        .approvals
        .finish_execution(&r.id, job_id, outcome, refused)?;
    if let Some(d) = &done {
        tracing::info!(approval_id = %d.id, operation = %d.operation, status = d.status.as_str(), "approved operation finished");
    }
    Ok(done)
}

/// The operation itself, as the requester is now.
fn run(state: &AppState, r: &ApprovalRequest) -> RunEnd {
    let params = match OperationParams::parse(r.operation, &r.params) {
        Ok(p) => p,
        Err(e) => return RunEnd::Failed(e),
    };
    let principal = match state.auth.principal_for_approval(&r.requester_id, &r.id) {
        Ok(p) => p,
        Err(e) => return RunEnd::Refused(format!("requester {}: {e}", r.requester_id)),
    };
    let meta = RequestMeta::default();
    if let Err(e) = check_requester(state, &principal, &meta, &params) {
        return RunEnd::Refused(format!("requester {} no longer may: {e}", r.requester_id));
    }
    let outcome: Result<Value, ServiceError> = match &params {
        OperationParams::KeyRotation(p) => state
            .keyring
            .rotate(&principal.user_id, None, &r.reason, p.force)
            .map_err(ServiceError::from)
            .map(|o| to_value(&o)),
        OperationParams::KeyCleanup => state
            .keyring
            .cleanup_expired(&principal.user_id, None, state.config.key_destroy_grace)
            .map_err(ServiceError::from)
            .map(|o| to_value(&o)),
        OperationParams::MigrationRun(p) => state
            .jobs
            .run_migration(&p.store, &principal.user_id)
            .map_err(ServiceError::from)
            .map(|j: JobRecord| json!({"job_id": j.id, "state": j.state, "results": j.results})),
        OperationParams::SessionsRevokeAll => state
            .auth
            .revoke_all_sessions(&principal, &meta)
            .map(|o| to_value(&o)),
        OperationParams::PrivilegedRoleGrant(g) => state
            .auth
            .add_role(&principal, &g.user_id, &g.role, &meta)
            .map(|u| json!({"user_id": u.id, "roles": u.roles})),
        OperationParams::CustomRoleChange(c) => state
            .auth
            .put_role(
                &principal,
                &c.name,
                &c.description,
                c.permissions.clone(),
                &meta,
            )
            .map(|role| to_value(&role)),
        OperationParams::UserDelete(d) => state
            .auth
            .delete_user(&principal, &d.user_id, &meta)
            .map(|o| to_value(&o)),
        OperationParams::SecretExport(p) => Ok(json!({
            "secrets": p.ids.len(),
            "download": format!("GET /api/security/approvals/{}/export (the requester, once)", r.id),
        })),
        OperationParams::IpUnblock(u) => state
            .auth
            .unblock_ip(&principal, &u.ip, &meta)
            .map(|()| json!({"unblocked": u.ip})),
        OperationParams::MasterKeyRotation => Err(ServiceError::BadRequest(
            "master_key_rotation runs offline with the new key".into(),
        )),
    };
    match outcome {
        Ok(v) => RunEnd::Done(v),
        Err(ServiceError::Forbidden { permission }) => {
            RunEnd::Refused(format!("requester {} lacks {permission}", r.requester_id))
        }
        Err(e) => RunEnd::Failed(e.to_string()),
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
