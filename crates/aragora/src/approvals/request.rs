//! One approval request and the rules of deciding it: who may, in which state,
//! with what confirmation. Pure: the service loads a request, applies one of
//! these under a compare-and-set, audits the outcome and stores it.

use serde::{Deserialize, Serialize};

use super::catalogue::{Operation, RiskLevel};
use crate::clock::{format_opt, format_us};

/// Bounds on what a requester or approver can make us store per request.
pub const MAX_REASON_BYTES: usize = 1024;
pub const MAX_NOTES_BYTES: usize = 2048;
pub const MAX_INCIDENT_ID_BYTES: usize = 128;
pub const MAX_PARAMS_BYTES: usize = 4096;
pub const MAX_RESULT_BYTES: usize = 8192;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for decisions.
    Pending,
    /// Enough approvals (or an emergency bypass): the operation will run once.
    Approved,
    /// Handed to the jobs service; `execution.job_id` names the job.
    Executing,
    Executed,
    /// The operation ran and failed; `execution.error` says why.
    Failed,
    /// The requester no longer held the authority when it was time to run.
    Refused,
    Rejected,
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Executing => "executing",
            Self::Executed => "executed",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }

    /// No decision or execution changes it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Executed | Self::Failed | Self::Refused | Self::Rejected | Self::Expired
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Approve,
    Reject,
    EmergencyBypass,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub kind: DecisionKind,
    pub approver_id: String,
    pub at: i64,
    pub notes: Option<String>,
    pub reason: Option<String>,
    pub incident_id: Option<String>,
    pub checklist_confirmed: Vec<String>,
    /// An admin approved without confirming the checklist.
    pub bypass_checklist: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    pub job_id: String,
    pub started_at: i64,
    /// Until when the runner that started it owns it; after that a runner that
    /// finds it still executing takes it over (the first runner died).
    #[serde(default)]
    pub lease_until: i64,
    /// How often a runner took it over after the previous one died.
    #[serde(default)]
    pub takeovers: u32,
    pub finished_at: Option<i64>,
    /// The operation's own result (bounded), when it ran.
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: String,
    pub operation: Operation,
    pub risk_level: RiskLevel,
    /// What the operation runs with, exactly as requested (bounded).
    pub params: serde_json::Value,
    pub reason: String,
    pub requester_id: String,
    pub requested_at: i64,
    pub expires_at: i64,
    pub required_approvals: u8,
    pub checklist: Vec<String>,
    pub status: Status,
    pub decisions: Vec<Decision>,
    pub execution: Option<Execution>,
}

/// The party deciding, as the service resolved it from the token and the store.
#[derive(Clone, Copy, Debug)]
pub struct Decider<'a> {
    pub user_id: &'a str,
    pub roles: &'a [String],
    pub disabled: bool,
    /// Holds `approvals.approve` (through any role).
    pub can_approve: bool,
}

impl Decider<'_> {
    fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Why a decision was refused. `is_unauthorized` ones are attempts to decide
/// without the authority (audited as `unauthorized_approval` and counted); the
/// rest are state conflicts or incomplete input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("requesters cannot decide their own request")]
    OwnRequest,
    #[error("not an eligible approver for {operation}: {why}")]
    NotEligible { operation: Operation, why: String },
    #[error("the account is disabled")]
    Disabled,
    #[error("only an admin may approve with bypass_checklist")]
    ChecklistBypassNotAllowed,
    #[error("emergency bypass needs the security_lead role")]
    BypassNotAllowed,
    #[error("the request is {status}, no longer pending", status = .0.as_str())]
    NotPending(Status),
    #[error("the request expired at {}", format_us(*.0))]
    Expired(i64),
    #[error("this approver already approved the request")]
    AlreadyApproved,
    #[error("checklist not confirmed: {}", .0.join("; "))]
    ChecklistIncomplete(Vec<String>),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
}

impl Refusal {
    pub fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            Self::OwnRequest
                | Self::NotEligible { .. }
                | Self::Disabled
                | Self::ChecklistBypassNotAllowed
                | Self::BypassNotAllowed
        )
    }

    /// A short machine-readable reason for audit `details.why` and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::OwnRequest => "own_request",
            Self::NotEligible { .. } => "not_eligible",
            Self::Disabled => "disabled",
            Self::ChecklistBypassNotAllowed => "checklist_bypass_not_allowed",
            Self::BypassNotAllowed => "bypass_not_allowed",
            Self::NotPending(_) => "not_pending",
            Self::Expired(_) => "expired",
            Self::AlreadyApproved => "already_approved",
            Self::ChecklistIncomplete(_) => "checklist_incomplete",
            Self::Missing(_) => "missing_field",
            Self::TooLong { .. } => "too_long",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApproveInput {
    pub notes: Option<String>,
    pub reason: Option<String>,
    pub checklist_confirmed: Vec<String>,
    pub bypass_checklist: bool,
}

/// What a successful approval changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Approval {
    /// Recorded; more approvals are needed.
    Recorded { approvals: u8, required: u8 },
    /// This approval was the last one needed: the operation is now to run.
    Approved,
}

fn bounded(field: &'static str, v: &Option<String>, max: usize) -> Result<(), Refusal> {
    match v {
        Some(s) if s.len() > max => Err(Refusal::TooLong { field, max }),
        _ => Ok(()),
    }
}

fn required(field: &'static str, v: Option<String>, max: usize) -> Result<String, Refusal> {
    let v = v
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or(Refusal::Missing(field))?;
    bounded(field, &Some(v.clone()), max)?;
    Ok(v)
}

impl ApprovalRequest {
    pub fn approvals(&self) -> impl Iterator<Item = &Decision> {
        self.decisions
            .iter()
            .filter(|d| d.kind == DecisionKind::Approve)
    }

    fn approval_count(&self) -> u8 {
        u8::try_from(self.approvals().count()).unwrap_or(u8::MAX)
    }

    /// Marks a pending request expired once its time is up; true if it changed.
    pub fn expire_if_due(&mut self, now_us: i64) -> bool {
        if self.status == Status::Pending && now_us >= self.expires_at {
            self.status = Status::Expired;
            return true;
        }
        false
    }

    /// The request can still be decided (state, then time).
    fn check_open(&self, now_us: i64) -> Result<(), Refusal> {
        if self.status != Status::Pending {
            return Err(Refusal::NotPending(self.status));
        }
        if now_us >= self.expires_at {
            return Err(Refusal::Expired(self.expires_at));
        }
        Ok(())
    }

    /// Authority first, so an unauthorized attempt is reported as such even
    /// on a request that is no longer pending.
    fn check_decider(&self, d: &Decider<'_>) -> Result<(), Refusal> {
        if d.disabled {
            return Err(Refusal::Disabled);
        }
        if d.user_id == self.requester_id {
            return Err(Refusal::OwnRequest);
        }
        let policy = self.operation.policy();
        if !d.can_approve {
            return Err(Refusal::NotEligible {
                operation: self.operation,
                why: "lacks the approvals.approve permission".into(),
            });
        }
        if !policy.approver_roles.iter().any(|r| d.has_role(r)) {
            return Err(Refusal::NotEligible {
                operation: self.operation,
                why: format!(
                    "needs one of the roles {}",
                    policy.approver_roles.join(", ")
                ),
            });
        }
        Ok(())
    }

    pub fn approve(
        &mut self,
        d: &Decider<'_>,
        input: ApproveInput,
        now_us: i64,
    ) -> Result<Approval, Refusal> {
        self.check_decider(d)?;
        if input.bypass_checklist && !d.has_role("admin") {
            return Err(Refusal::ChecklistBypassNotAllowed);
        }
        self.check_open(now_us)?;
        if self.approvals().any(|a| a.approver_id == d.user_id) {
            return Err(Refusal::AlreadyApproved);
        }
        bounded("notes", &input.notes, MAX_NOTES_BYTES)?;
        bounded("reason", &input.reason, MAX_REASON_BYTES)?;
        if !input.bypass_checklist {
            let missing: Vec<String> = self
                .checklist
                .iter()
                .filter(|item| !input.checklist_confirmed.iter().any(|c| c == *item))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(Refusal::ChecklistIncomplete(missing));
            }
        }
        // Only items of the checklist are kept: the confirmation list is input.
        let confirmed = self
            .checklist
            .iter()
            .filter(|item| input.checklist_confirmed.iter().any(|c| c == *item))
            .cloned()
            .collect();
        self.decisions.push(Decision {
            kind: DecisionKind::Approve,
            approver_id: d.user_id.to_owned(),
            at: now_us,
            notes: input.notes,
            reason: input.reason,
            incident_id: None,
            checklist_confirmed: confirmed,
            bypass_checklist: input.bypass_checklist,
        });
        let approvals = self.approval_count();
        if approvals >= self.required_approvals {
            self.status = Status::Approved;
            Ok(Approval::Approved)
        } else {
            Ok(Approval::Recorded {
                approvals,
                required: self.required_approvals,
            })
        }
    }

    pub fn reject(
        &mut self,
        d: &Decider<'_>,
        reason: Option<String>,
        now_us: i64,
    ) -> Result<(), Refusal> {
        self.check_decider(d)?;
        self.check_open(now_us)?;
        let reason = required("reason", reason, MAX_REASON_BYTES)?;
        self.decisions.push(Decision {
            kind: DecisionKind::Reject,
            approver_id: d.user_id.to_owned(),
            at: now_us,
            notes: None,
            reason: Some(reason),
            incident_id: None,
            checklist_confirmed: Vec::new(),
            bypass_checklist: false,
        });
        self.status = Status::Rejected;
        Ok(())
    }

    /// A security lead runs the operation now, without the approvals it lacks.
    pub fn emergency_bypass(
        &mut self,
        d: &Decider<'_>,
        reason: Option<String>,
        incident_id: Option<String>,
        now_us: i64,
    ) -> Result<(), Refusal> {
        if d.disabled {
            return Err(Refusal::Disabled);
        }
        if d.user_id == self.requester_id {
            return Err(Refusal::OwnRequest);
        }
        if !d.has_role("security_lead") {
            return Err(Refusal::BypassNotAllowed);
        }
        self.check_open(now_us)?;
        let reason = required("reason", reason, MAX_REASON_BYTES)?;
        let incident_id = required("incident_id", incident_id, MAX_INCIDENT_ID_BYTES)?;
        self.decisions.push(Decision {
            kind: DecisionKind::EmergencyBypass,
            approver_id: d.user_id.to_owned(),
            at: now_us,
            notes: None,
            reason: Some(reason),
            incident_id: Some(incident_id),
            checklist_confirmed: Vec::new(),
            bypass_checklist: true,
        });
        self.status = Status::Approved;
        Ok(())
    }

    /// Approved → executing, once: a second call (a concurrent approval, a
    /// restart) finds it executing and does not start the job again.
    pub fn begin_execution(&mut self, job_id: &str, now_us: i64, lease_us: i64) -> bool {
        if self.status != Status::Approved {
            return false;
        }
        self.status = Status::Executing;
        self.execution = Some(Execution {
            job_id: job_id.to_owned(),
            started_at: now_us,
            lease_until: now_us.saturating_add(lease_us),
            takeovers: 0,
            finished_at: None,
            result: None,
            error: None,
        });
        true
    }

    /// Executing with an expired lease (its runner died) → owned by a new
    /// runner; returns the job id of the dead runner's attempt. `known_dead`:
    /// the caller knows the runner is gone whatever its lease says (the first
    /// pass after a restart on a store no other process opens).
    pub fn take_over(
        &mut self,
        job_id: &str,
        now_us: i64,
        lease_us: i64,
        known_dead: bool,
    ) -> Option<String> {
        if self.status != Status::Executing {
            return None;
        }
        let exec = self.execution.as_mut()?;
        if exec.lease_until > now_us && !known_dead {
            return None;
        }
        let previous = std::mem::replace(&mut exec.job_id, job_id.to_owned());
        exec.lease_until = now_us.saturating_add(lease_us);
        exec.takeovers = exec.takeovers.saturating_add(1);
        Some(previous)
    }

    /// Keeps the lease of a long execution (a migration) while it runs.
    pub fn renew_lease(&mut self, job_id: &str, now_us: i64, lease_us: i64) -> bool {
        match self.execution.as_mut() {
            Some(e) if self.status == Status::Executing && e.job_id == job_id => {
                e.lease_until = now_us.saturating_add(lease_us);
                true
            }
            _ => false,
        }
    }

    /// Records how the execution ended. A result larger than the bound is
    /// replaced by a note saying so: the request keeps a bounded size.
    pub fn finish_execution(
        &mut self,
        outcome: Result<serde_json::Value, String>,
        refused: bool,
        now_us: i64,
    ) {
        let exec = self.execution.get_or_insert_with(|| Execution {
            job_id: String::new(),
            started_at: now_us,
            lease_until: now_us,
            takeovers: 0,
            finished_at: None,
            result: None,
            error: None,
        });
        exec.finished_at = Some(now_us);
        match outcome {
            Ok(v) => {
                let size = serde_json::to_vec(&v).map_or(usize::MAX, |b| b.len());
                exec.result = Some(if size <= MAX_RESULT_BYTES {
                    v
                } else {
                    serde_json::json!({"truncated": true, "bytes": size})
                });
                self.status = Status::Executed;
            }
            Err(e) => {
                let mut e = e;
                if e.len() > MAX_RESULT_BYTES {
                    let mut cut = MAX_RESULT_BYTES;
                    while !e.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    e.truncate(cut);
                }
                exec.error = Some(e);
                self.status = if refused {
                    Status::Refused
                } else {
                    Status::Failed
                };
            }
        }
    }
}

/// `GET /api/security/approvals/pending`: one entry.
#[derive(Clone, Debug, Serialize)]
pub struct PendingView {
    pub id: String,
    pub operation: Operation,
    pub risk_level: RiskLevel,
    /// `YYYY-MM-DDTHH:MM:SSZ`, no fraction (jq's `fromdateiso8601`).
    pub requested_at: String,
    pub requester_id: String,
    pub reason: String,
    pub checklist: Vec<String>,
    pub approvals: Vec<DecisionView>,
    pub required_approvals: u8,
    pub expires_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecisionView {
    pub kind: DecisionKind,
    pub approver_id: String,
    pub at: String,
    pub notes: Option<String>,
    pub reason: Option<String>,
    pub incident_id: Option<String>,
    pub checklist_confirmed: Vec<String>,
    pub bypass_checklist: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExecutionView {
    pub job_id: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Runs that died before finishing and were taken over.
    pub takeovers: u32,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// `GET /api/security/approvals/{id}`: any status, with decisions and result.
#[derive(Clone, Debug, Serialize)]
pub struct RequestView {
    pub id: String,
    pub operation: Operation,
    pub risk_level: RiskLevel,
    pub status: Status,
    pub params: serde_json::Value,
    pub reason: String,
    pub requester_id: String,
    pub requested_at: String,
    pub expires_at: String,
    pub required_approvals: u8,
    pub checklist: Vec<String>,
    pub decisions: Vec<DecisionView>,
    pub execution: Option<ExecutionView>,
}

/// The 202 body of a gated call or an explicit request.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedView {
    pub approval_id: String,
    pub status: Status,
    pub operation: Operation,
    pub risk_level: RiskLevel,
    pub expires_at: String,
}

impl Decision {
    pub fn view(&self) -> DecisionView {
        DecisionView {
            kind: self.kind,
            approver_id: self.approver_id.clone(),
            at: format_us(self.at),
            notes: self.notes.clone(),
            reason: self.reason.clone(),
            incident_id: self.incident_id.clone(),
            checklist_confirmed: self.checklist_confirmed.clone(),
            bypass_checklist: self.bypass_checklist,
        }
    }
}

impl ApprovalRequest {
    pub fn pending_view(&self) -> PendingView {
        PendingView {
            id: self.id.clone(),
            operation: self.operation,
            risk_level: self.risk_level,
            requested_at: format_us(self.requested_at),
            requester_id: self.requester_id.clone(),
            reason: self.reason.clone(),
            checklist: self.checklist.clone(),
            approvals: self.approvals().map(Decision::view).collect(),
            required_approvals: self.required_approvals,
            expires_at: format_us(self.expires_at),
        }
    }

    pub fn view(&self) -> RequestView {
        RequestView {
            id: self.id.clone(),
            operation: self.operation,
            risk_level: self.risk_level,
            status: self.status,
            params: self.params.clone(),
            reason: self.reason.clone(),
            requester_id: self.requester_id.clone(),
            requested_at: format_us(self.requested_at),
            expires_at: format_us(self.expires_at),
            required_approvals: self.required_approvals,
            checklist: self.checklist.clone(),
            decisions: self.decisions.iter().map(Decision::view).collect(),
            execution: self.execution.as_ref().map(|e| ExecutionView {
                job_id: e.job_id.clone(),
                started_at: format_us(e.started_at),
                finished_at: format_opt(e.finished_at),
                takeovers: e.takeovers,
                result: e.result.clone(),
                error: e.error.clone(),
            }),
        }
    }

    pub fn created_view(&self) -> CreatedView {
        CreatedView {
            approval_id: self.id.clone(),
            status: self.status,
            operation: self.operation,
            risk_level: self.risk_level,
            expires_at: format_us(self.expires_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000_000;

    fn request(op: Operation) -> ApprovalRequest {
        let policy = op.policy();
        ApprovalRequest {
            id: "apr_1".into(),
            operation: op,
            risk_level: policy.risk_level,
            params: serde_json::json!({}),
            reason: "quarterly rotation".into(),
            requester_id: "u_req".into(),
            requested_at: 0,
            expires_at: HOUR,
            required_approvals: policy.required_approvals,
            checklist: policy.checklist.iter().map(|s| s.to_string()).collect(),
            status: Status::Pending,
            decisions: Vec::new(),
            execution: None,
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn decider<'a>(id: &'a str, roles: &'a [String]) -> Decider<'a> {
        Decider {
            user_id: id,
            roles,
            disabled: false,
            can_approve: true,
        }
    }

    fn confirmed(r: &ApprovalRequest) -> ApproveInput {
        ApproveInput {
            checklist_confirmed: r.checklist.clone(),
            ..ApproveInput::default()
        }
    }

    #[test]
    fn one_eligible_approval_with_the_checklist_approves_a_high_risk_request() {
        let mut r = request(Operation::KeyRotation);
        let approver = roles(&["approver"]);
        let input = confirmed(&r);
        assert_eq!(
            r.approve(&decider("u_a", &approver), input, 10),
            Ok(Approval::Approved)
        );
        assert_eq!(r.status, Status::Approved);
        assert!(r.begin_execution("job_1", 11, 100));
        assert!(!r.begin_execution("job_2", 12, 100), "runs once");
        assert_eq!(
            r.take_over("job_2", 50, 100, false),
            None,
            "the lease holds"
        );
        assert_eq!(
            r.take_over("job_2", 111, 100, false).as_deref(),
            Some("job_1")
        );
        assert_eq!(
            r.take_over("job_3", 112, 100, false),
            None,
            "the new lease holds"
        );
        assert_eq!(
            r.take_over("job_3", 113, 100, true).as_deref(),
            Some("job_2")
        );
        r.finish_execution(Ok(serde_json::json!({"new_key_id": "k2"})), false, 13);
        assert_eq!(r.status, Status::Executed);
        let exec = r.view().execution.expect("execution");
        assert_eq!((exec.job_id.as_str(), exec.takeovers), ("job_3", 2));
    }

    #[test]
    fn critical_needs_two_distinct_leads() {
        let mut r = request(Operation::MasterKeyRotation);
        let lead = roles(&["security_lead"]);
        let admin = roles(&["admin"]);
        let approver = roles(&["approver"]);
        let input = confirmed(&r);
        assert!(matches!(
            r.approve(&decider("u_a", &approver), input.clone(), 1),
            Err(Refusal::NotEligible { .. })
        ));
        assert_eq!(
            r.approve(&decider("u_l", &lead), input.clone(), 1),
            Ok(Approval::Recorded {
                approvals: 1,
                required: 2
            })
        );
        assert_eq!(
            r.approve(&decider("u_l", &lead), input.clone(), 2),
            Err(Refusal::AlreadyApproved)
        );
        assert_eq!(
            r.approve(&decider("u_ad", &admin), input, 3),
            Ok(Approval::Approved)
        );
    }

    #[test]
    fn refusals_name_why_and_say_which_are_unauthorized() {
        let approver = roles(&["approver"]);
        let viewer = roles(&["viewer"]);
        let r0 = request(Operation::KeyRotation);
        let input = confirmed(&r0);

        let mut r = r0.clone();
        let own = r.approve(&decider("u_req", &approver), input.clone(), 1);
        assert_eq!(own, Err(Refusal::OwnRequest));
        assert!(own.expect_err("refused").is_unauthorized());

        let no_perm = Decider {
            can_approve: false,
            ..decider("u_v", &viewer)
        };
        let e = r.approve(&no_perm, input.clone(), 1).expect_err("refused");
        assert!(e.is_unauthorized() && e.to_string().contains("approvals.approve"));

        let disabled = Decider {
            disabled: true,
            ..decider("u_a", &approver)
        };
        assert_eq!(
            r.approve(&disabled, input.clone(), 1),
            Err(Refusal::Disabled)
        );

        let bypass = ApproveInput {
            bypass_checklist: true,
            ..ApproveInput::default()
        };
        let e = r
            .approve(&decider("u_a", &approver), bypass, 1)
            .expect_err("refused");
        assert_eq!(e, Refusal::ChecklistBypassNotAllowed);
        assert!(e.is_unauthorized());

        let partial = ApproveInput {
            checklist_confirmed: vec![r.checklist[0].clone()],
            ..ApproveInput::default()
        };
        let e = r
            .approve(&decider("u_a", &approver), partial, 1)
            .expect_err("refused");
        assert!(matches!(&e, Refusal::ChecklistIncomplete(m) if m.len() == r.checklist.len() - 1));
        assert!(!e.is_unauthorized());
        assert!(r.decisions.is_empty(), "refusals record nothing");

        let e = r
            .approve(&decider("u_a", &approver), input.clone(), HOUR)
            .expect_err("refused");
        assert_eq!(e, Refusal::Expired(HOUR));
        assert!(r.expire_if_due(HOUR));
        assert_eq!(
            r.approve(&decider("u_a", &approver), input.clone(), HOUR),
            Err(Refusal::NotPending(Status::Expired))
        );
    }

    #[test]
    fn an_admin_may_bypass_the_checklist_and_it_is_recorded() {
        let mut r = request(Operation::KeyRotation);
        let admin = roles(&["admin"]);
        let input = ApproveInput {
            reason: Some("Emergency override per runbook".into()),
            bypass_checklist: true,
            ..ApproveInput::default()
        };
        assert_eq!(
            r.approve(&decider("u_ad", &admin), input, 1),
            Ok(Approval::Approved)
        );
        assert!(r.decisions[0].bypass_checklist);
        assert!(r.decisions[0].checklist_confirmed.is_empty());
    }

    #[test]
    fn reject_needs_a_reason_and_ends_the_request() {
        let mut r = request(Operation::MigrationRun);
        let approver = roles(&["approver"]);
        assert_eq!(
            r.reject(&decider("u_a", &approver), Some("  ".into()), 1),
            Err(Refusal::Missing("reason"))
        );
        r.reject(&decider("u_a", &approver), Some("not needed".into()), 1)
            .expect("reject");
        assert_eq!(r.status, Status::Rejected);
        let input = confirmed(&r);
        assert_eq!(
            r.approve(&decider("u_b", &approver), input, 2),
            Err(Refusal::NotPending(Status::Rejected))
        );
    }

    #[test]
    fn emergency_bypass_is_for_security_leads_with_reason_and_incident() {
        let mut r = request(Operation::MasterKeyRotation);
        let lead = roles(&["security_lead"]);
        let admin = roles(&["admin"]);
        assert_eq!(
            r.emergency_bypass(
                &decider("u_ad", &admin),
                Some("x".into()),
                Some("INC-1".into()),
                1
            ),
            Err(Refusal::BypassNotAllowed)
        );
        assert_eq!(
            r.emergency_bypass(&decider("u_l", &lead), Some("phone".into()), None, 1),
            Err(Refusal::Missing("incident_id"))
        );
        assert_eq!(
            r.emergency_bypass(&decider("u_l", &lead), None, Some("INC-1".into()), 1),
            Err(Refusal::Missing("reason"))
        );
        r.emergency_bypass(
            &decider("u_l", &lead),
            Some("Emergency bypass - contacted via phone".into()),
            Some("INC-12345".into()),
            1,
        )
        .expect("bypass");
        assert_eq!(r.status, Status::Approved);
        assert_eq!(r.decisions[0].incident_id.as_deref(), Some("INC-12345"));
    }

    #[test]
    fn input_sizes_are_bounded() {
        let mut r = request(Operation::KeyRotation);
        let approver = roles(&["approver"]);
        let mut input = confirmed(&r);
        input.notes = Some("n".repeat(MAX_NOTES_BYTES + 1));
        assert_eq!(
            r.approve(&decider("u_a", &approver), input, 1),
            Err(Refusal::TooLong {
                field: "notes",
                max: MAX_NOTES_BYTES
            })
        );
        r.status = Status::Approved;
        assert!(r.begin_execution("j", 1, 100));
        r.finish_execution(
            Ok(serde_json::json!("x".repeat(MAX_RESULT_BYTES * 2))),
            false,
            2,
        );
        let exec = r.execution.as_ref().expect("execution");
        assert_eq!(exec.result.as_ref().expect("result")["truncated"], true);
    }

    #[test]
    fn requested_at_has_no_fraction() {
        let mut r = request(Operation::KeyRotation);
        r.requested_at = 1_764_547_200_123_456;
        let v = serde_json::to_value(r.pending_view()).expect("json");
        assert_eq!(v["requested_at"], "2025-12-01T00:00:00Z");
        assert_eq!(v["operation"], "key_rotation");
        assert_eq!(v["risk_level"], "high");
    }
}
