//! The approval service: creates requests, applies decisions with their audit
//! entry in the same atomic write, expires what waited too long, and keeps the
//! approval metrics exact (recomputed from the store, so a restart loses none).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::catalogue::{Operation, RiskLevel};
use super::params::OperationParams;
use super::request::{
    Approval, ApprovalRequest, ApproveInput, Decider, MAX_PARAMS_BYTES, MAX_REASON_BYTES,
    PendingView, Refusal, Status,
};
use super::store::{ApprovalStore, request_id};
use crate::audit::{AuditEvent, AuditLog, Outcome, RecordError};
use crate::clock::now_us;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::{Expect, Store, StoreError, WriteOp};

/// Timeouts outside this range are refused at boot (a typo such as `72` for
/// 72 hours would otherwise expire every request at once).
pub const MIN_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Open (pending or approved, not yet run) requests at once, in all and per
/// requester: what an authenticated caller can make us store and scan.
pub const DEFAULT_MAX_OPEN: usize = 1_000;
pub const DEFAULT_MAX_OPEN_PER_REQUESTER: usize = 20;

/// Approval settings, validated once at boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalSettings {
    /// Indexed by `Operation as usize`.
    timeouts: Vec<Duration>,
    pub auto_approve_low: bool,
    pub max_open: usize,
    pub max_open_per_requester: usize,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            timeouts: Operation::all()
                .map(|o| o.policy().risk_level.default_timeout())
                .collect(),
            auto_approve_low: false,
            max_open: DEFAULT_MAX_OPEN,
            max_open_per_requester: DEFAULT_MAX_OPEN_PER_REQUESTER,
        }
    }
}

impl ApprovalSettings {
    /// From `APPROVAL_TIMEOUT_<OPERATION>` (seconds) and
    /// `APPROVAL_AUTO_APPROVE_LOW` (`true`/`false`), naming the variable that
    /// is wrong.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut s = Self::default();
        for op in Operation::all() {
            let var = op.timeout_env_var();
            if let Some(v) = get(&var) {
                let secs: u64 = v.trim().parse().map_err(|_| {
                    format!("{var}={v:?} is not a whole number of seconds (e.g. 7200)")
                })?;
                let d = Duration::from_secs(secs);
                if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&d) {
                    return Err(format!(
                        "{var}={secs} is outside {}..={} seconds",
                        MIN_TIMEOUT.as_secs(),
                        MAX_TIMEOUT.as_secs()
                    ));
                }
                s.timeouts[op as usize] = d;
            }
        }
        if let Some(v) = get("APPROVAL_AUTO_APPROVE_LOW") {
            s.auto_approve_low = match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(format!(
                        "APPROVAL_AUTO_APPROVE_LOW={v:?} is not true or false"
                    ));
                }
            };
        }
        Ok(s)
    }

    pub fn timeout(&self, op: Operation) -> Duration {
        self.timeouts[op as usize]
    }

    /// No request stays pending longer than this: "everything that can still be
    /// pending" is the window of requests made since `now - longest`.
    pub fn longest_timeout(&self) -> Duration {
        self.timeouts.iter().copied().max().unwrap_or(MAX_TIMEOUT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval request {id}: {refusal}")]
    Refused { id: String, refusal: Refusal },
    #[error("approval request {0} not found")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooMany(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

impl From<StoreError> for ApprovalError {
    fn from(e: StoreError) -> Self {
        Self::Service(e.into())
    }
}

impl From<RecordError> for ApprovalError {
    fn from(e: RecordError) -> Self {
        Self::Service(e.into())
    }
}

impl From<ApprovalError> for ServiceError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::Refused { ref refusal, .. } => {
                let message = e.to_string();
                match refusal {
                    r if r.is_unauthorized() => ServiceError::Forbidden {
                        permission: message,
                    },
                    Refusal::NotPending(_) | Refusal::Expired(_) | Refusal::AlreadyApproved => {
                        ServiceError::Conflict(message)
                    }
                    _ => ServiceError::BadRequest(message),
                }
            }
            ApprovalError::NotFound(_) => ServiceError::NotFound(e.to_string()),
            ApprovalError::BadRequest(m) => ServiceError::BadRequest(m),
            ApprovalError::TooMany(m) => ServiceError::Conflict(m),
            ApprovalError::Service(s) => s,
        }
    }
}

/// Who asks, from where.
#[derive(Clone, Debug)]
pub struct Requester<'a> {
    pub user_id: &'a str,
    pub ip: Option<String>,
}

#[derive(Debug)]
pub struct ApprovalService {
    store: ApprovalStore,
    audit: Arc<AuditLog>,
    metrics: Metrics,
    settings: ApprovalSettings,
    /// Approval webhook notifications, when `APPROVAL_WEBHOOK_URL` is set.
    notifier: Option<Arc<super::notify::Notifier>>,
}

/// How often pending requests are checked for expiry (and the gauges
/// refreshed): the timeout alert and the pending list lag by at most this.
pub const EXPIRY_INTERVAL: Duration = Duration::from_secs(15);

/// Attempts of one compare-and-set decision before giving up.
const DECIDE_RETRIES: usize = 32;

/// How long a runner owns an execution before another may take it over. The
/// short operations finish well within it; a migration renews it while its
/// job runs.
pub const EXECUTION_LEASE: Duration = Duration::from_secs(60);

fn lease_us() -> i64 {
    i64::try_from(EXECUTION_LEASE.as_micros()).unwrap_or(i64::MAX)
}

impl ApprovalService {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        settings: ApprovalSettings,
    ) -> Self {
        Self {
            store: ApprovalStore::new(store),
            audit,
            metrics,
            settings,
            notifier: None,
        }
    }

    /// Sends each lifecycle event of a request to the approval webhook.
    pub fn with_notifier(mut self, notifier: Arc<super::notify::Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// Queues a notification (never waits; see `notify`).
    fn notify(&self, event: super::notify::Event, r: &ApprovalRequest) {
        if let Some(n) = &self.notifier {
            n.enqueue(super::notify::Notification::new(event, r));
        }
    }

    /// For the execution code: `executed`, or `failed` when the run failed or
    /// was refused, once the outcome is stored on `r`.
    pub fn notify_executed(&self, r: &ApprovalRequest) {
        use super::notify::Event;
        match r.status {
            Status::Executed => self.notify(Event::Executed, r),
            Status::Failed | Status::Refused => self.notify(Event::Failed, r),
            _ => {}
        }
    }

    pub fn settings(&self) -> &ApprovalSettings {
        &self.settings
    }

    fn count(&self, r: &ApprovalRequest, outcome: &str) {
        self.metrics
            .approval_requests
            .with_label_values(&[r.operation.as_str(), r.risk_level.as_str(), outcome])
            .inc();
    }

    /// Creates a pending request (or, for a low-risk operation with
    /// auto-approval on, an approved one). Its audit entry is written with it.
    pub fn request(
        &self,
        who: &Requester<'_>,
        operation: Operation,
        params: Value,
        reason: &str,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(ApprovalError::BadRequest("reason is required".into()));
        }
        if reason.len() > MAX_REASON_BYTES {
            return Err(ApprovalError::BadRequest(format!(
                "reason is longer than {MAX_REASON_BYTES} bytes"
            )));
        }
        let params = OperationParams::parse(operation, &params)
            .map_err(ApprovalError::BadRequest)?
            .to_value();
        let params_len = serde_json::to_vec(&params).map_or(usize::MAX, |b| b.len());
        if params_len > MAX_PARAMS_BYTES {
            return Err(ApprovalError::BadRequest(format!(
                "params is {params_len} bytes, more than {MAX_PARAMS_BYTES}"
            )));
        }
        let now = now_us();
        let open = self.open_requests(now)?;
        if open.len() >= self.settings.max_open {
            return Err(ApprovalError::TooMany(format!(
                "{} approval requests are open (limit {}); decide or let some expire first",
                open.len(),
                self.settings.max_open
            )));
        }
        let mine = open
            .iter()
            .filter(|r| r.requester_id == who.user_id)
            .count();
        if mine >= self.settings.max_open_per_requester {
            return Err(ApprovalError::TooMany(format!(
                "you have {mine} open approval requests (limit {})",
                self.settings.max_open_per_requester
            )));
        }
        let policy = operation.policy();
        let timeout =
            i64::try_from(self.settings.timeout(operation).as_micros()).unwrap_or(i64::MAX);
        let auto = self.settings.auto_approve_low && policy.risk_level == RiskLevel::Low;
        let random = crate::auth::tokens::random_hex(4)?;
        let r = ApprovalRequest {
            id: request_id(now, &random),
            operation,
            risk_level: policy.risk_level,
            params,
            reason: reason.to_owned(),
            requester_id: who.user_id.to_owned(),
            requested_at: now,
            expires_at: now.saturating_add(timeout),
            required_approvals: policy.required_approvals,
            checklist: policy.checklist.iter().map(|s| s.to_string()).collect(),
            status: if auto {
                Status::Approved
            } else {
                Status::Pending
            },
            decisions: Vec::new(),
            execution: None,
        };
        let event = AuditEvent::new("approval_requested", who.user_id, Outcome::Success)
            .ip(who.ip.clone())
            .details(json!({
                "approval_id": r.id,
                "operation": operation.as_str(),
                "risk_level": policy.risk_level.as_str(),
                "reason": r.reason,
                "expires_at": crate::clock::format_us(r.expires_at),
                "auto_approved": auto,
            }));
        let op = WriteOp::put_json(
            crate::store::Collection::Approvals,
            r.id.clone(),
            &r,
            Expect::Absent,
        )?;
        self.audit.record_with(event, vec![op])?;
        self.count(&r, "requested");
        if auto {
            self.count(&r, "approved");
        }
        self.notify(
            if auto {
                super::notify::Event::Approved
            } else {
                super::notify::Event::Requested
            },
            &r,
        );
        self.refresh_gauges_from(&open, Some(&r), now);
        Ok(r)
    }

    /// Requests that may still be pending or waiting to run (the window of the
    /// longest timeout), bounded by the open-request cap plus what was decided
    /// in that window.
    fn open_requests(&self, now: i64) -> Result<Vec<ApprovalRequest>, ApprovalError> {
        let longest = i64::try_from(self.settings.longest_timeout().as_micros()).unwrap_or(0);
        // Every request in the window, decided or not, is read: bound the scan
        // by a multiple of the open cap, beyond which creation is refused anyway.
        let scan_limit = self.settings.max_open.saturating_mul(8).max(1_000);
        Ok(self
            .store
            .since(now.saturating_sub(longest), scan_limit)?
            .into_iter()
            .filter(|r| {
                matches!(
                    r.status,
                    Status::Pending | Status::Approved | Status::Executing
                )
            })
            .collect())
    }

    pub fn get(&self, id: &str) -> Result<ApprovalRequest, ApprovalError> {
        self.store
            .get(id)?
            .ok_or_else(|| ApprovalError::NotFound(id.to_owned()))
    }

    /// Pending, not yet past expiry, oldest first, optionally of one risk level.
    pub fn pending(&self, risk: Option<RiskLevel>) -> Result<Vec<PendingView>, ApprovalError> {
        let now = now_us();
        Ok(self
            .open_requests(now)?
            .iter()
            .filter(|r| r.status == Status::Pending && r.expires_at > now)
            .filter(|r| risk.is_none_or(|l| r.risk_level == l))
            .map(ApprovalRequest::pending_view)
            .collect())
    }

    /// Newest first, before `before`, optionally filtered.
    pub fn history(
        &self,
        before: Option<&str>,
        limit: usize,
        status: Option<Status>,
        operation: Option<Operation>,
    ) -> Result<Vec<ApprovalRequest>, ApprovalError> {
        let mut out = Vec::new();
        let mut cursor = before.map(str::to_owned);
        // Filters may skip many; read pages until the limit or the start.
        loop {
            let page = self.store.history(cursor.as_deref(), 200)?;
            let n = page.len();
            cursor = page.last().map(|r| r.id.clone());
            out.extend(page.into_iter().filter(|r| {
                status.is_none_or(|s| r.status == s) && operation.is_none_or(|o| r.operation == o)
            }));
            if out.len() >= limit || n < 200 {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }

    /// Applies `rule` under compare-and-set with its audit entry in the same
    /// write. A refusal is audited too: `unauthorized_approval` (and counted)
    /// when the caller lacked the authority, `approval_refused` otherwise.
    fn decide<T>(
        &self,
        id: &str,
        decider: &Decider<'_>,
        ip: Option<String>,
        action: &'static str,
        rule: impl FnMut(&mut ApprovalRequest, i64) -> Result<T, Refusal>,
        details: impl Fn(&ApprovalRequest, &T) -> Value,
    ) -> Result<(T, ApprovalRequest), ApprovalError> {
        match self.apply(id, decider.user_id, ip.clone(), action, rule, details)? {
            Ok(done) => Ok(done),
            Err((refusal, r)) => {
                self.audit_refusal(id, &r, decider, ip, action, &refusal)?;
                Err(ApprovalError::Refused {
                    id: id.to_owned(),
                    refusal,
                })
            }
        }
    }

    /// The compare-and-set loop under `decide` and the execution steps: a
    /// refusal is returned with the request as read, not audited.
    #[allow(clippy::type_complexity)]
    fn apply<T>(
        &self,
        id: &str,
        actor: &str,
        ip: Option<String>,
        action: &'static str,
        mut rule: impl FnMut(&mut ApprovalRequest, i64) -> Result<T, Refusal>,
        details: impl Fn(&ApprovalRequest, &T) -> Value,
    ) -> Result<Result<(T, ApprovalRequest), (Refusal, ApprovalRequest)>, ApprovalError> {
        for _ in 0..DECIDE_RETRIES {
            let Some((version, mut r)) = crate::store::get_json::<ApprovalRequest>(
                self.store_ref(),
                crate::store::Collection::Approvals,
                id,
            )?
            else {
                return Err(ApprovalError::NotFound(id.to_owned()));
            };
            let now = now_us();
            let out = match rule(&mut r, now) {
                Ok(out) => out,
                Err(refusal) => return Ok(Err((refusal, r))),
            };
            let mut d = details(&r, &out);
            if let Value::Object(m) = &mut d {
                m.insert("approval_id".into(), json!(id));
                m.insert("operation".into(), json!(r.operation.as_str()));
                m.insert("risk_level".into(), json!(r.risk_level.as_str()));
                m.insert("status".into(), json!(r.status.as_str()));
            }
            let event = AuditEvent::new(action, actor, Outcome::Success)
                .ip(ip.clone())
                .details(d);
            let op = WriteOp::put_json(
                crate::store::Collection::Approvals,
                id,
                &r,
                Expect::Version(version),
            )?;
            match self.audit.record_with(event, vec![op]) {
                Ok(_) => return Ok(Ok((out, r))),
                Err(RecordError::Ops(e)) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApprovalError::Service(ServiceError::Unavailable(format!(
            "approval request {id} kept changing; retry"
        ))))
    }

    fn store_ref(&self) -> &dyn Store {
        self.store.inner()
    }

    fn audit_refusal(
        &self,
        id: &str,
        r: &ApprovalRequest,
        decider: &Decider<'_>,
        ip: Option<String>,
        attempted: &'static str,
        refusal: &Refusal,
    ) -> Result<(), ApprovalError> {
        let unauthorized = refusal.is_unauthorized();
        let action = if unauthorized {
            self.metrics.approval_unauthorized_attempts.inc();
            "unauthorized_approval"
        } else {
            "approval_refused"
        };
        let event = AuditEvent::new(
            action,
            decider.user_id,
            if unauthorized {
                Outcome::Denied
            } else {
                Outcome::Failure
            },
        )
        .ip(ip)
        .details(json!({
            "approval_id": id,
            "request_id": id,
            "operation": r.operation.as_str(),
            "risk_level": r.risk_level.as_str(),
            "attempted": attempted,
            "why": refusal.code(),
            "message": refusal.to_string(),
            "severity": if unauthorized { "high" } else { "info" },
        }));
        self.audit.record(event).map_err(ServiceError::from)?;
        Ok(())
    }

    pub fn approve(
        &self,
        id: &str,
        decider: &Decider<'_>,
        input: ApproveInput,
        ip: Option<String>,
    ) -> Result<(Approval, ApprovalRequest), ApprovalError> {
        let (approval, r) = self.decide(
            id,
            decider,
            ip,
            "approval_approved",
            |r, now| r.approve(decider, input.clone(), now),
            |r, a| {
                let last = r.approvals().last();
                json!({
                    "approvals": r.approvals().count(),
                    "required_approvals": r.required_approvals,
                    "complete": *a == Approval::Approved,
                    "bypass_checklist": last.is_some_and(|d| d.bypass_checklist),
                    "notes": last.and_then(|d| d.notes.clone()),
                    "severity": if last.is_some_and(|d| d.bypass_checklist) { "critical" } else { "info" },
                })
            },
        )?;
        if approval == Approval::Approved {
            self.count(&r, "approved");
            self.notify(super::notify::Event::Approved, &r);
        }
        self.refresh_gauges()?;
        Ok((approval, r))
    }

    pub fn reject(
        &self,
        id: &str,
        decider: &Decider<'_>,
        reason: Option<String>,
        ip: Option<String>,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let ((), r) = self.decide(
            id,
            decider,
            ip,
            "approval_rejected",
            |r, now| r.reject(decider, reason.clone(), now),
            |r, _| json!({"reason": r.decisions.last().and_then(|d| d.reason.clone())}),
        )?;
        self.count(&r, "rejected");
        self.notify(super::notify::Event::Rejected, &r);
        self.refresh_gauges()?;
        Ok(r)
    }

    pub fn emergency_bypass(
        &self,
        id: &str,
        decider: &Decider<'_>,
        reason: Option<String>,
        incident_id: Option<String>,
        ip: Option<String>,
    ) -> Result<ApprovalRequest, ApprovalError> {
        let ((), r) = self.decide(
            id,
            decider,
            ip,
            "approval_emergency_bypass",
            |r, now| r.emergency_bypass(decider, reason.clone(), incident_id.clone(), now),
            |r, _| {
                let d = r.decisions.last();
                json!({
                    "reason": d.and_then(|d| d.reason.clone()),
                    "incident_id": d.and_then(|d| d.incident_id.clone()),
                    "severity": "critical",
                })
            },
        )?;
        self.count(&r, "bypassed");
        self.notify(super::notify::Event::EmergencyBypass, &r);
        self.refresh_gauges()?;
        Ok(r)
    }

    /// Approved → executing under `job_id`, once. `None` when the request is
    /// not (or no longer) approved: another runner took it, or it was decided
    /// otherwise. Audited `approval_execution_started`.
    pub fn begin_execution(
        &self,
        id: &str,
        job_id: &str,
    ) -> Result<Option<ApprovalRequest>, ApprovalError> {
        let lease = lease_us();
        Ok(self
            .apply(
                id,
                "system",
                None,
                "approval_execution_started",
                |r, now| {
                    if r.begin_execution(job_id, now, lease) {
                        Ok(())
                    } else {
                        Err(Refusal::NotPending(r.status))
                    }
                },
                |r, _| json!({"job_id": job_id, "requester_id": r.requester_id}),
            )?
            .ok()
            .map(|((), r)| r))
    }

    /// An execution whose runner died (lease expired) → owned by `job_id`;
    /// returns the request and the dead attempt's job id. Audited
    /// `approval_execution_taken_over`.
    pub fn take_over_execution(
        &self,
        id: &str,
        job_id: &str,
        known_dead: bool,
    ) -> Result<Option<(ApprovalRequest, String)>, ApprovalError> {
        let lease = lease_us();
        Ok(self
            .apply(
                id,
                "system",
                None,
                "approval_execution_taken_over",
                |r, now| {
                    r.take_over(job_id, now, lease, known_dead)
                        .ok_or(Refusal::NotPending(r.status))
                },
                |_, previous| json!({"job_id": job_id, "previous_job_id": previous}),
            )?
            .ok()
            .map(|(previous, r)| (r, previous)))
    }

    /// Extends the lease of a long execution still running under `job_id`.
    pub fn renew_execution_lease(&self, id: &str, job_id: &str) -> Result<bool, ApprovalError> {
        let lease = lease_us();
        let renewed = self.store.update(id, |r: &mut ApprovalRequest| {
            if r.renew_lease(job_id, now_us(), lease) {
                Ok(())
            } else {
                Err(())
            }
        });
        match renewed {
            Ok(_) => Ok(true),
            Err(super::store::UpdateError::Refused(())) => Ok(false),
            Err(super::store::UpdateError::NotFound(id)) => Err(ApprovalError::NotFound(id)),
            Err(super::store::UpdateError::Store(e)) => Err(e.into()),
        }
    }

    /// Records the end of the execution run under `job_id` (its result or
    /// why it failed or was refused), with its audit entry, once; `None` when
    /// that run no longer owns the request.
    pub fn finish_execution(
        &self,
        id: &str,
        job_id: &str,
        outcome: Result<Value, String>,
        refused: bool,
    ) -> Result<Option<ApprovalRequest>, ApprovalError> {
        let action = match (&outcome, refused) {
            (Ok(_), _) => "approval_executed",
            (Err(_), true) => "approval_execution_refused",
            (Err(_), false) => "approval_execution_failed",
        };
        let done = self
            .apply(
                id,
                "system",
                None,
                action,
                |r, now| {
                    let owned = r.status == Status::Executing
                        && r.execution.as_ref().is_some_and(|e| e.job_id == job_id);
                    if !owned {
                        return Err(Refusal::NotPending(r.status));
                    }
                    r.finish_execution(outcome.clone(), refused, now);
                    Ok(())
                },
                |r, _| {
                    let e = r.execution.as_ref();
                    json!({
                        "job_id": job_id,
                        "requester_id": r.requester_id,
                        "error": e.and_then(|e| e.error.clone()),
                        "severity": if r.status == Status::Executed { "info" } else { "high" },
                    })
                },
            )?
            .ok()
            .map(|((), r)| r);
        if let Some(r) = &done {
            self.count(r, r.status.as_str());
            self.notify_executed(r);
        }
        Ok(done)
    }

    /// Requests an executor must act on: approved and not started, or
    /// executing (the executor checks the lease or the job behind it).
    pub fn awaiting_execution(&self) -> Result<Vec<ApprovalRequest>, ApprovalError> {
        Ok(self
            .open_requests(now_us())?
            .into_iter()
            .filter(|r| matches!(r.status, Status::Approved | Status::Executing))
            .collect())
    }

    /// Marks every pending request past its time expired (audited
    /// `approval_expired`, counted in `aragora_approval_timeouts_total`), and
    /// refreshes the gauges. Run periodically; safe on many replicas (each
    /// expiry is a compare-and-set: one replica records it).
    pub fn expire_due(&self) -> Result<usize, ApprovalError> {
        let now = now_us();
        let mut expired = 0;
        for r in self.open_requests(now)? {
            if r.status != Status::Pending || r.expires_at > now {
                continue;
            }
            let system = Decider {
                user_id: "system",
                roles: &[],
                disabled: false,
                can_approve: false,
            };
            let result = self.decide(
                &r.id,
                &system,
                None,
                "approval_expired",
                |r, now| {
                    if r.expire_if_due(now) {
                        Ok(())
                    } else {
                        Err(Refusal::NotPending(r.status))
                    }
                },
                |r, _| {
                    json!({
                        "requester_id": r.requester_id,
                        "approvals": r.approvals().count(),
                        "required_approvals": r.required_approvals,
                    })
                },
            );
            match result {
                Ok(((), r)) => {
                    expired += 1;
                    self.metrics.approval_timeouts.inc();
                    self.count(&r, "expired");
                    self.notify(super::notify::Event::Expired, &r);
                }
                // Decided or expired by someone else meanwhile.
                Err(ApprovalError::Refused { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.refresh_gauges()?;
        Ok(expired)
    }

    /// One periodic pass (`EXPIRY_INTERVAL`): expiries and gauges; a failure is
    /// logged and retried on the next pass.
    pub fn tick(&self) {
        match self.expire_due() {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "approval requests expired"),
            Err(e) => tracing::warn!(error = %e, "approval expiry pass failed; retrying"),
        }
    }

    /// `aragora_pending_critical_approvals` and the age of the oldest one, from
    /// the store (exact after a restart and across replicas).
    pub fn refresh_gauges(&self) -> Result<(), ApprovalError> {
        let now = now_us();
        let open = self.open_requests(now)?;
        self.refresh_gauges_from(&open, None, now);
        Ok(())
    }

    fn refresh_gauges_from(
        &self,
        open: &[ApprovalRequest],
        new: Option<&ApprovalRequest>,
        now: i64,
    ) {
        let critical: Vec<&ApprovalRequest> = open
            .iter()
            .chain(new)
            .filter(|r| {
                r.status == Status::Pending
                    && r.risk_level == RiskLevel::Critical
                    && r.expires_at > now
            })
            .collect();
        self.metrics
            .pending_critical_approvals
            .set(i64::try_from(critical.len()).unwrap_or(i64::MAX));
        let oldest = critical.iter().map(|r| r.requested_at).min();
        self.metrics
            .oldest_pending_critical_approval_age
            .set(oldest.map_or(0, |t| (now - t).max(0) / 1_000_000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::store::request_id;
    use crate::audit::SearchFilter;
    use crate::store::EmbeddedStore;

    struct Fixture {
        _dir: tempfile::TempDir,
        svc: ApprovalService,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        raw: ApprovalStore,
    }

    fn fixture(settings: ApprovalSettings) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("db"), [1; 32], [2; 32]).expect("open"));
        let audit = Arc::new(AuditLog::new(store.clone()));
        let metrics = Metrics::new().expect("metrics").with_known_series();
        Fixture {
            svc: ApprovalService::new(store.clone(), audit.clone(), metrics.clone(), settings),
            raw: ApprovalStore::new(store),
            audit,
            metrics,
            _dir: dir,
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn who(id: &str) -> Requester<'_> {
        Requester {
            user_id: id,
            ip: Some("10.0.0.7".into()),
        }
    }

    fn entries(audit: &AuditLog, action: &str) -> Vec<crate::audit::AuditEntry> {
        audit
            .search(&SearchFilter {
                action: Some(action.into()),
                actor: None,
                minutes: None,
                before: None,
                limit: 100,
            })
            .expect("search")
            .entries
    }

    #[test]
    fn settings_read_timeouts_and_name_the_bad_variable() {
        let s = ApprovalSettings::from_lookup(|k| {
            (k == "APPROVAL_TIMEOUT_KEY_ROTATION").then(|| "7200".to_string())
        })
        .expect("valid");
        assert_eq!(s.timeout(Operation::KeyRotation), Duration::from_secs(7200));
        assert_eq!(
            s.timeout(Operation::MigrationRun),
            RiskLevel::Medium.default_timeout()
        );
        for (var, value) in [
            ("APPROVAL_TIMEOUT_KEY_ROTATION", "2h"),
            ("APPROVAL_TIMEOUT_USER_DELETE", "5"),
            ("APPROVAL_TIMEOUT_SECRET_EXPORT", "99999999"),
            ("APPROVAL_AUTO_APPROVE_LOW", "yes"),
        ] {
            let e = ApprovalSettings::from_lookup(|k| (k == var).then(|| value.to_string()))
                .expect_err("refused");
            assert!(e.contains(var), "{e}");
        }
    }

    #[test]
    fn a_request_is_pending_then_approved_with_audit_rows_and_exact_metrics() {
        let f = fixture(ApprovalSettings::default());
        let r = f
            .svc
            .request(
                &who("u_op"),
                Operation::KeyRotation,
                json!({"force": false}),
                "quarterly rotation",
            )
            .expect("request");
        assert_eq!(r.status, Status::Pending);
        let pending = f.svc.pending(None).expect("pending");
        assert_eq!(pending.len(), 1);
        assert!(
            f.svc
                .pending(Some(RiskLevel::Critical))
                .expect("p")
                .is_empty()
        );
        assert_eq!(entries(&f.audit, "approval_requested").len(), 1);

        let approver = roles(&["approver"]);
        let d = Decider {
            user_id: "u_ap",
            roles: &approver,
            disabled: false,
            can_approve: true,
        };
        let input = ApproveInput {
            notes: Some("Approved per escalation procedure".into()),
            checklist_confirmed: r.checklist.clone(),
            ..ApproveInput::default()
        };
        let (a, stored) = f.svc.approve(&r.id, &d, input, None).expect("approve");
        assert_eq!(a, Approval::Approved);
        assert_eq!(stored.status, Status::Approved);
        assert_eq!(f.svc.get(&r.id).expect("get").status, Status::Approved);
        assert!(f.svc.pending(None).expect("pending").is_empty());
        let rows = entries(&f.audit, "approval_approved");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].details["approval_id"], r.id.as_str());
        assert_eq!(rows[0].details["complete"], true);
        let approved = f
            .metrics
            .approval_requests
            .with_label_values(&["key_rotation", "high", "approved"])
            .get();
        assert_eq!(approved, 1);
    }

    #[test]
    fn refusals_are_audited_and_unauthorized_ones_counted() {
        let f = fixture(ApprovalSettings::default());
        let r = f
            .svc
            .request(
                &who("u_op"),
                Operation::SessionsRevokeAll,
                json!({}),
                "incident",
            )
            .expect("request");
        let approver = roles(&["approver"]);
        let own = Decider {
            user_id: "u_op",
            roles: &approver,
            disabled: false,
            can_approve: true,
        };
        let e = f
            .svc
            .approve(
                &r.id,
                &own,
                ApproveInput::default(),
                Some("10.1.1.1".into()),
            )
            .expect_err("own request");
        assert!(matches!(
            ServiceError::from(e),
            ServiceError::Forbidden { .. }
        ));
        let rows = entries(&f.audit, "unauthorized_approval");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].ip_address.as_deref(), Some("10.1.1.1"));
        assert_eq!(rows[0].details["why"], "own_request");
        assert_eq!(rows[0].details["request_id"], r.id.as_str());
        assert_eq!(f.metrics.approval_unauthorized_attempts.get(), 1);

        // Incomplete input is refused and audited, but does not page.
        let other = Decider {
            user_id: "u_ap",
            ..own
        };
        let e = f
            .svc
            .approve(&r.id, &other, ApproveInput::default(), None)
            .expect_err("checklist");
        assert!(matches!(ServiceError::from(e), ServiceError::BadRequest(_)));
        assert_eq!(f.metrics.approval_unauthorized_attempts.get(), 1);
        assert_eq!(entries(&f.audit, "approval_refused").len(), 1);

        f.svc
            .reject(&r.id, &other, Some("not needed".into()), None)
            .expect("reject");
        let e = f
            .svc
            .reject(&r.id, &other, Some("again".into()), None)
            .expect_err("decided");
        assert!(matches!(ServiceError::from(e), ServiceError::Conflict(_)));
        assert_eq!(f.metrics.pending_critical_approvals.get(), 0);
    }

    #[test]
    fn critical_gauges_and_expiry_follow_the_store() {
        let f = fixture(ApprovalSettings::default());
        let now = now_us();
        let hour = 3_600_000_000;
        let mut old = f
            .svc
            .request(
                &who("u_op"),
                Operation::SessionsRevokeAll,
                json!({}),
                "incident",
            )
            .expect("request");
        // Pretend it was asked 90 minutes ago and expires in a second.
        old.id = request_id(now - hour - hour / 2, "00000001");
        old.requested_at = now - hour - hour / 2;
        old.expires_at = now + hour;
        f.raw.insert(&old).expect("insert");
        f.svc.refresh_gauges().expect("gauges");
        assert_eq!(f.metrics.pending_critical_approvals.get(), 2);
        assert!(f.metrics.oldest_pending_critical_approval_age.get() >= 5400);

        let mut due = old.clone();
        due.id = request_id(now - 2 * hour, "00000002");
        due.requested_at = now - 2 * hour;
        due.expires_at = now - 1;
        f.raw.insert(&due).expect("insert");
        assert_eq!(f.svc.expire_due().expect("expire"), 1);
        assert_eq!(f.svc.expire_due().expect("again"), 0, "expired once");
        assert_eq!(f.svc.get(&due.id).expect("get").status, Status::Expired);
        assert_eq!(f.metrics.approval_timeouts.get(), 1);
        assert_eq!(entries(&f.audit, "approval_expired").len(), 1);
        assert_eq!(f.metrics.pending_critical_approvals.get(), 2);
    }

    #[test]
    fn open_requests_are_bounded_per_requester_and_in_all() {
        let f = fixture(ApprovalSettings {
            max_open: 5,
            max_open_per_requester: 3,
            ..ApprovalSettings::default()
        });
        for _ in 0..3 {
            f.svc
                .request(
                    &who("u_a"),
                    Operation::MigrationRun,
                    json!({"store": "all"}),
                    "r",
                )
                .expect("request");
        }
        let e = f
            .svc
            .request(
                &who("u_a"),
                Operation::MigrationRun,
                json!({"store": "all"}),
                "r",
            )
            .expect_err("per requester");
        assert!(e.to_string().contains("limit 3"), "{e}");
        for _ in 0..2 {
            f.svc
                .request(
                    &who("u_b"),
                    Operation::MigrationRun,
                    json!({"store": "all"}),
                    "r",
                )
                .expect("request");
        }
        let e = f
            .svc
            .request(
                &who("u_c"),
                Operation::MigrationRun,
                json!({"store": "all"}),
                "r",
            )
            .expect_err("in all");
        assert!(e.to_string().contains("limit 5"), "{e}");
        let big = json!({"store": "y".repeat(MAX_PARAMS_BYTES)});
        assert!(matches!(
            f.svc
                .request(&who("u_d"), Operation::MigrationRun, big, "r"),
            Err(ApprovalError::BadRequest(_))
        ));
    }
}
