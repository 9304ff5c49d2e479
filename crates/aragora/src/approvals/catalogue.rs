//! The gated operations: what each one risks, how many approvals it needs, who
//! may decide, what the approver confirms, and how long a request may wait.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RiskLevel {
    Low,
    Medium,
    High,
    Critical,
}

impl RiskLevel {
    pub const ALL: [RiskLevel; 4] = [Self::Low, Self::Medium, Self::High, Self::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    /// How long a request waits for its decisions unless
    /// `APPROVAL_TIMEOUT_<OPERATION>` says otherwise. A critical request outlives
    /// the hour after which `CriticalOperationPendingTooLong` pages, so the page
    /// comes before the request silently expires.
    pub fn default_timeout(self) -> Duration {
        Duration::from_secs(match self {
            Self::Low => 24 * 3600,
            Self::Medium => 12 * 3600,
            Self::High => 8 * 3600,
            Self::Critical => 4 * 3600,
        })
    }
}

impl fmt::Display for RiskLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RiskLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("risk_level {s:?} is not one of low, medium, high, critical"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    KeyRotation,
    KeyCleanup,
    MigrationRun,
    MasterKeyRotation,
    SessionsRevokeAll,
    PrivilegedRoleGrant,
    CustomRoleChange,
    UserDelete,
    SecretExport,
    IpUnblock,
}

/// Who may decide a request besides holding `approvals.approve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperationPolicy {
    pub operation: Operation,
    pub risk_level: RiskLevel,
    /// Distinct approvers needed before the operation runs.
    pub required_approvals: u8,
    /// The permission whose holders may request it (besides `approvals.request`,
    /// which lets a holder ask for any gated operation).
    pub permission: &'static str,
    /// Roles whose holders may approve or reject it (`admin` always may).
    pub approver_roles: &'static [&'static str],
    /// What each approver confirms (`checklist_confirmed`), unless an admin
    /// bypasses the checklist.
    pub checklist: &'static [&'static str],
}

const APPROVERS: &[&str] = &["approver", "security_lead", "admin"];
const LEADS: &[&str] = &["security_lead", "admin"];

pub const CATALOGUE: &[OperationPolicy] = &[
    OperationPolicy {
        operation: Operation::KeyRotation,
        risk_level: RiskLevel::High,
        required_approvals: 1,
        permission: "encryption.rotate",
        approver_roles: APPROVERS,
        checklist: &[
            "key ring backup taken",
            "migration capacity checked for the re-encryption that follows",
            "rollback plan reviewed",
        ],
    },
    OperationPolicy {
        operation: Operation::KeyCleanup,
        risk_level: RiskLevel::High,
        required_approvals: 1,
        permission: "encryption.rotate",
        approver_roles: APPROVERS,
        checklist: &[
            "migration status shows no record on the keys to retire",
            "key ring backup taken",
        ],
    },
    OperationPolicy {
        operation: Operation::MigrationRun,
        risk_level: RiskLevel::Medium,
        required_approvals: 1,
        permission: "migration.run",
        approver_roles: APPROVERS,
        checklist: &["dry run reviewed", "change window agreed"],
    },
    OperationPolicy {
        operation: Operation::MasterKeyRotation,
        risk_level: RiskLevel::Critical,
        required_approvals: 2,
        permission: "encryption.rotate",
        approver_roles: LEADS,
        checklist: &[
            "new master key stored in the secret manager",
            "key ring backup taken",
            "every replica can be restarted with the new key",
        ],
    },
    OperationPolicy {
        operation: Operation::SessionsRevokeAll,
        risk_level: RiskLevel::Critical,
        required_approvals: 1,
        permission: "sessions.revoke",
        approver_roles: APPROVERS,
        checklist: &["incident declared", "every user will need to log in again"],
    },
    OperationPolicy {
        operation: Operation::PrivilegedRoleGrant,
        risk_level: RiskLevel::High,
        required_approvals: 1,
        permission: "users.manage",
        approver_roles: APPROVERS,
        checklist: &["grantee identity verified", "business need recorded"],
    },
    OperationPolicy {
        operation: Operation::CustomRoleChange,
        risk_level: RiskLevel::High,
        required_approvals: 1,
        permission: "roles.manage",
        approver_roles: APPROVERS,
        checklist: &[
            "sensitive permissions reviewed",
            "holders of the role reviewed",
        ],
    },
    OperationPolicy {
        operation: Operation::UserDelete,
        risk_level: RiskLevel::Medium,
        required_approvals: 1,
        permission: "users.manage",
        approver_roles: APPROVERS,
        checklist: &["user's secrets reassigned or exported"],
    },
    OperationPolicy {
        operation: Operation::SecretExport,
        risk_level: RiskLevel::High,
        required_approvals: 1,
        permission: "secrets.read",
        approver_roles: APPROVERS,
        checklist: &["destination approved", "data owner informed"],
    },
    OperationPolicy {
        operation: Operation::IpUnblock,
        // Undoes a defence, but only lets an address try again under every
        // other limit; with APPROVAL_AUTO_APPROVE_LOW it runs at once.
        risk_level: RiskLevel::Low,
        required_approvals: 1,
        permission: "ratelimit.manage",
        approver_roles: APPROVERS,
        checklist: &["the cause of the block is resolved"],
    },
];

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KeyRotation => "key_rotation",
            Self::KeyCleanup => "key_cleanup",
            Self::MigrationRun => "migration_run",
            Self::MasterKeyRotation => "master_key_rotation",
            Self::SessionsRevokeAll => "sessions_revoke_all",
            Self::PrivilegedRoleGrant => "privileged_role_grant",
            Self::CustomRoleChange => "custom_role_change",
            Self::UserDelete => "user_delete",
            Self::SecretExport => "secret_export",
            Self::IpUnblock => "ip_unblock",
        }
    }

    pub fn policy(self) -> &'static OperationPolicy {
        // CATALOGUE lists the operations in declaration order (a test checks it).
        &CATALOGUE[self as usize]
    }

    /// `APPROVAL_TIMEOUT_KEY_ROTATION` for `key_rotation`.
    pub fn timeout_env_var(self) -> String {
        format!("APPROVAL_TIMEOUT_{}", self.as_str().to_ascii_uppercase())
    }

    pub fn all() -> impl Iterator<Item = Operation> {
        CATALOGUE.iter().map(|p| p.operation)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Operation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::all().find(|o| o.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::all().map(Operation::as_str).collect();
            format!(
                "operation {s:?} is not gated; gated operations: {}",
                names.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac::catalogue;

    #[test]
    fn every_operation_has_exactly_one_policy_with_known_names() {
        for (i, op) in Operation::all().enumerate() {
            assert_eq!(op as usize, i, "CATALOGUE is in declaration order");
            assert_eq!(CATALOGUE.iter().filter(|p| p.operation == op).count(), 1);
            let p = op.policy();
            assert_eq!(p.operation, op);
            assert!(p.required_approvals >= 1, "{op}");
            assert!(!p.checklist.is_empty(), "{op}");
            assert!(
                catalogue::find(p.permission).is_some(),
                "{op}: {}",
                p.permission
            );
            for r in p.approver_roles {
                assert!(catalogue::builtin(r).is_some(), "{op}: role {r}");
                assert!(
                    catalogue::builtin(r)
                        .is_some_and(|b| b.permissions.contains(&"approvals.approve")
                            || b.permissions.contains(&catalogue::WILDCARD)),
                    "{op}: role {r} cannot approve"
                );
            }
            assert_eq!(op.as_str().parse::<Operation>(), Ok(op));
        }
        assert_eq!(Operation::all().count(), 10);
    }

    #[test]
    fn names_and_env_vars_are_the_runbook_spelling() {
        assert_eq!(
            Operation::KeyRotation.timeout_env_var(),
            "APPROVAL_TIMEOUT_KEY_ROTATION"
        );
        assert_eq!(
            serde_json::to_string(&Operation::MasterKeyRotation).expect("json"),
            "\"master_key_rotation\""
        );
        assert_eq!(
            serde_json::to_string(&RiskLevel::Critical).expect("json"),
            "\"critical\""
        );
        assert!(
            "rm_rf"
                .parse::<Operation>()
                .expect_err("refused")
                .contains("key_rotation")
        );
        assert!("urgent".parse::<RiskLevel>().is_err());
    }

    #[test]
    fn critical_requests_outlive_the_one_hour_page() {
        assert!(RiskLevel::Critical.default_timeout() > Duration::from_secs(3600));
        assert!(RiskLevel::Low < RiskLevel::Critical);
    }
}
