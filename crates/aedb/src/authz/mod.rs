//! Callers, permissions, grants and the authorization decision.
//!
//! Rules (least privilege, scoped):
//! - `GlobalAdmin` covers everything; every operation allowed only through it is
//!   audited in `authz_audit` as `global_admin_use`.
//! - The owner of a project and `ProjectAdmin { project }` cover everything inside
//!   that project, including granting and revoking permissions scoped to it.
//! - `ScopeAdmin { project, scope }` covers reads, writes and DDL inside one scope.
//! - `KvRead`/`KvWrite` cover a project, optionally narrowed to a scope and a key
//!   prefix; `TableRead`/`TableWrite` to a scope and a table; `TableDdl` to a scope.
//!   Writing does not imply reading.
//! - `AuditRead` allows reading the system audit tables.
//! - `Backup` and `Checkpoint` allow those maintenance operations on demand, instance
//!   wide (no project owner or admin holds them implicitly); every use is audited.
//! - A grant to `role:NAME` applies to every caller whose context carries role NAME.
//! - A permission may be granted (or revoked) by GlobalAdmin, by the owner or a
//!   ProjectAdmin of its project, or by a holder of a covering grant marked `delegable`.
//!
//! Decisions read the *current* grants at every call: a revoke takes effect on the
//! very next operation, including reads through snapshots opened before it.

use std::fmt;

use imbl::OrdMap;

use crate::error::AedbError;
use crate::model::validate_name;
use crate::record::DdlOperation;
use serde::{Deserialize, Serialize};

/// Who is calling. Authentication happens in the host; aedb trusts the id it is
/// given and decides what that id may do. The fields are private so that every
/// context went through the validation of `new` / `builder(..).build()`: an id
/// written into audit rows and alert counters is always printable and bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerContext {
    caller_id: String,
    roles: Vec<String>,
}

/// Builds a `CallerContext` with roles: `CallerContext::builder(id).role(r).build()`.
#[derive(Clone, Debug)]
#[must_use = "call build() to get the CallerContext"]
pub struct CallerContextBuilder {
    caller_id: String,
    roles: Vec<String>,
}

/// Longest role name a context accepts (grants are further bounded by the
/// instance's name limit: a longer role can never hold a grant).
const MAX_ROLE_LEN: usize = 256;

impl CallerContext {
    /// A caller without roles. Fails (`InvalidArgument`) unless `caller_id` is
    /// 1..=256 printable ASCII characters without spaces and not `role:...`.
    pub fn new(caller_id: impl Into<String>) -> Result<Self, AedbError> {
        Self::builder(caller_id).build()
    }

    pub fn builder(caller_id: impl Into<String>) -> CallerContextBuilder {
        CallerContextBuilder {
            caller_id: caller_id.into(),
            roles: Vec::new(),
        }
    }

    pub fn caller_id(&self) -> &str {
        &self.caller_id
    }

    /// The roles whose grants (`role:NAME`) this caller holds.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    fn principals(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(self.caller_id.clone())
            .chain(self.roles.iter().map(|r| format!("role:{r}")))
    }
}

impl CallerContextBuilder {
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.roles.push(role.into());
        self
    }

    pub fn build(self) -> Result<CallerContext, AedbError> {
        validate_caller_id(&self.caller_id)?;
        for r in &self.roles {
            validate_name("role", r, MAX_ROLE_LEN)?;
        }
        Ok(CallerContext {
            caller_id: self.caller_id,
            roles: self.roles,
        })
    }
}

/// Caller ids come from the host's authentication (user ids, emails, service
/// names): printable ASCII without spaces, 1..=256 bytes. `role:` is refused: it
/// is how grants name a role, so such an id would hold that role's grants.
pub(crate) fn validate_caller_id(id: &str) -> Result<(), AedbError> {
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AedbError::InvalidArgument(format!(
            "caller id must be 1..=256 printable ASCII characters without spaces, got {} bytes",
            id.len()
        )));
    }
    if id.starts_with("role:") {
        return Err(AedbError::InvalidArgument(
            "caller id must not start with \"role:\" (that names a role's grants)".into(),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Permission {
    KvRead {
        project: String,
        scope: Option<String>,
        prefix: Option<Vec<u8>>,
    },
    KvWrite {
        project: String,
        scope: Option<String>,
        prefix: Option<Vec<u8>>,
    },
    TableRead {
        project: String,
        scope: Option<String>,
        table: Option<String>,
    },
    TableWrite {
        project: String,
        scope: Option<String>,
        table: Option<String>,
    },
    TableDdl {
        project: String,
        scope: Option<String>,
    },
    ProjectAdmin {
        project: String,
    },
    ScopeAdmin {
        project: String,
        scope: String,
    },
    AuditRead,
    GlobalAdmin,
    // Appended after every older variant: grants are logged and checkpointed as
    // postcard, which encodes a variant by its index.
    /// Taking full and incremental backups (a copy of every project).
    Backup,
    /// Writing a checkpoint on demand (the automatic policy needs no caller).
    Checkpoint,
}

fn opt(o: &Option<String>) -> &str {
    o.as_deref().unwrap_or("*")
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permission::KvRead {
                project,
                scope,
                prefix,
            }
            | Permission::KvWrite {
                project,
                scope,
                prefix,
            } => {
                let kind = if matches!(self, Permission::KvRead { .. }) {
                    "KvRead"
                } else {
                    "KvWrite"
                };
                write!(f, "{kind}({project}/{}", opt(scope))?;
                if let Some(p) = prefix {
                    write!(f, ", prefix 0x{}", hex::encode(p))?;
                }
                f.write_str(")")
            }
            Permission::TableRead {
                project,
                scope,
                table,
            } => {
                write!(f, "TableRead({project}/{}/{})", opt(scope), opt(table))
            }
            Permission::TableWrite {
                project,
                scope,
                table,
            } => {
                write!(f, "TableWrite({project}/{}/{})", opt(scope), opt(table))
            }
            Permission::TableDdl { project, scope } => {
                write!(f, "TableDdl({project}/{})", opt(scope))
            }
            Permission::ProjectAdmin { project } => write!(f, "ProjectAdmin({project})"),
            Permission::ScopeAdmin { project, scope } => write!(f, "ScopeAdmin({project}/{scope})"),
            Permission::AuditRead => f.write_str("AuditRead"),
            Permission::GlobalAdmin => f.write_str("GlobalAdmin"),
            Permission::Backup => f.write_str("Backup"),
            Permission::Checkpoint => f.write_str("Checkpoint"),
        }
    }
}

impl Permission {
    /// What a KV read of `prefix` needs (`None`: the whole scope, as a range scan
    /// does; a range is not a prefix).
    pub(crate) fn kv_read(project: &str, scope: &str, prefix: Option<&[u8]>) -> Self {
        Permission::KvRead {
            project: project.to_string(),
            scope: Some(scope.to_string()),
            prefix: prefix.map(<[u8]>::to_vec),
        }
    }

    pub(crate) fn table_read(project: &str, scope: &str, table: &str) -> Self {
        Permission::TableRead {
            project: project.to_string(),
            scope: Some(scope.to_string()),
            table: Some(table.to_string()),
        }
    }

    /// The project this permission is confined to (None: instance-wide).
    pub fn project(&self) -> Option<&str> {
        match self {
            Permission::KvRead { project, .. }
            | Permission::KvWrite { project, .. }
            | Permission::TableRead { project, .. }
            | Permission::TableWrite { project, .. }
            | Permission::TableDdl { project, .. }
            | Permission::ProjectAdmin { project }
            | Permission::ScopeAdmin { project, .. } => Some(project),
            Permission::AuditRead
            | Permission::GlobalAdmin
            | Permission::Backup
            | Permission::Checkpoint => None,
        }
    }

    /// True when holding `self` implies holding `other`.
    pub fn covers(&self, other: &Permission) -> bool {
        use Permission::*;
        let scope_ok = |mine: &Option<String>, theirs: &Option<String>| match (mine, theirs) {
            (None, _) => true,
            (Some(a), Some(b)) => a == b,
            (Some(_), None) => false,
        };
        match (self, other) {
            (GlobalAdmin, _) => true,
            (ProjectAdmin { project }, o) => o.project() == Some(project.as_str()),
            (ScopeAdmin { project, scope }, o) => {
                o.project() == Some(project.as_str())
                    && match o {
                        KvRead { scope: s, .. }
                        | KvWrite { scope: s, .. }
                        | TableRead { scope: s, .. }
                        | TableWrite { scope: s, .. }
                        | TableDdl { scope: s, .. } => s.as_deref() == Some(scope.as_str()),
                        ScopeAdmin { scope: s, .. } => s == scope,
                        _ => false,
                    }
            }
            (
                KvRead {
                    project: p,
                    scope: s,
                    prefix: x,
                },
                KvRead {
                    project: q,
                    scope: t,
                    prefix: y,
                },
            )
            | (
                KvWrite {
                    project: p,
                    scope: s,
                    prefix: x,
                },
                KvWrite {
                    project: q,
                    scope: t,
                    prefix: y,
                },
            ) => {
                p == q
                    && scope_ok(s, t)
                    && match (x, y) {
                        (None, _) => true,
                        (Some(a), Some(b)) => b.starts_with(a),
                        (Some(_), None) => false,
                    }
            }
            (
                TableRead {
                    project: p,
                    scope: s,
                    table: a,
                },
                TableRead {
                    project: q,
                    scope: t,
                    table: b,
                },
            )
            | (
                TableWrite {
                    project: p,
                    scope: s,
                    table: a,
                },
                TableWrite {
                    project: q,
                    scope: t,
                    table: b,
                },
            ) => p == q && scope_ok(s, t) && scope_ok(a, b),
            (
                TableDdl {
                    project: p,
                    scope: s,
                },
                TableDdl {
                    project: q,
                    scope: t,
                },
            ) => p == q && scope_ok(s, t),
            (AuditRead, AuditRead) | (Backup, Backup) | (Checkpoint, Checkpoint) => true,
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub permission: Permission,
    pub delegable: bool,
    pub granted_by: String,
    pub granted_seq: u64,
}

/// Grants and ownership, part of the versioned state (replayed from the log and
/// stored in checkpoints).
#[derive(Clone, Debug, Default)]
pub(crate) struct AuthzState {
    /// Principal (caller id or `role:NAME`) -> grants.
    pub grants: OrdMap<String, Vec<Grant>>,
    pub owners: OrdMap<String, String>,
    pub bootstrapped: bool,
    /// Bumped by every change to grants or owners (in-process only): a commit
    /// validated against an older generation re-checks before it takes its number.
    pub generation: u64,
}

/// What an operation needs.
pub(crate) type Need = Permission;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Allowed,
    /// Allowed only because the caller is a GlobalAdmin: audit it.
    AllowedAsGlobalAdmin,
    Denied,
}

impl AuthzState {
    fn holds(&self, caller: &CallerContext) -> impl Iterator<Item = &Grant> {
        caller
            .principals()
            .filter_map(|p| self.grants.get(&p))
            .flatten()
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn is_owner(&self, caller: &CallerContext, project: Option<&str>) -> bool {
        project.is_some_and(|p| self.owners.get(p).is_some_and(|o| o == caller.caller_id()))
    }

    pub fn decide(&self, caller: &CallerContext, need: &Need) -> Decision {
        if self.is_owner(caller, need.project()) {
            return Decision::Allowed;
        }
        let mut global = false;
        for g in self.holds(caller) {
            if g.permission == Permission::GlobalAdmin {
                global = true;
            } else if g.permission.covers(need) {
                return Decision::Allowed;
            }
        }
        if global {
            Decision::AllowedAsGlobalAdmin
        } else {
            Decision::Denied
        }
    }

    /// Whether `caller` holds anything in `project`: its ownership or a grant
    /// confined to it (GlobalAdmin: audit it). Decides who learns that the project
    /// exists.
    pub fn sees_project(&self, caller: &CallerContext, project: &str) -> Decision {
        if self.is_owner(caller, Some(project)) {
            return Decision::Allowed;
        }
        let mut global = false;
        for g in self.holds(caller) {
            if g.permission == Permission::GlobalAdmin {
                global = true;
            } else if g.permission.project() == Some(project) {
                return Decision::Allowed;
            }
        }
        if global {
            Decision::AllowedAsGlobalAdmin
        } else {
            Decision::Denied
        }
    }

    /// Whether `caller` may grant or revoke `p`.
    pub fn may_delegate(&self, caller: &CallerContext, p: &Permission) -> Decision {
        if let Some(project) = p.project() {
            if self.is_owner(caller, Some(project)) {
                return Decision::Allowed;
            }
            let admin = Permission::ProjectAdmin {
                project: project.to_string(),
            };
            if self
                .holds(caller)
                .any(|g| g.permission != Permission::GlobalAdmin && g.permission.covers(&admin))
            {
                return Decision::Allowed;
            }
        }
        let mut global = false;
        for g in self.holds(caller) {
            if g.permission == Permission::GlobalAdmin {
                global = true;
            } else if g.delegable && g.permission.covers(p) {
                return Decision::Allowed;
            }
        }
        if global {
            Decision::AllowedAsGlobalAdmin
        } else {
            Decision::Denied
        }
    }

    pub fn grants_of(&self, principal: &str) -> Vec<Grant> {
        self.grants.get(principal).cloned().unwrap_or_default()
    }
}

impl AuthzState {
    /// Applies a grant, revoke or ownership change; other operations are no-ops here.
    pub(crate) fn apply(&mut self, op: &DdlOperation, actor: &str, seq: u64) {
        self.generation += 1;
        match op {
            DdlOperation::GrantPermission {
                grantee,
                permission,
                delegable,
            } => {
                let list = self.grants.entry(grantee.clone()).or_default();
                list.retain(|g| &g.permission != permission);
                list.push(Grant {
                    permission: permission.clone(),
                    delegable: *delegable,
                    granted_by: actor.to_string(),
                    granted_seq: seq,
                });
            }
            DdlOperation::RevokePermission {
                grantee,
                permission,
            } => {
                let now_empty = match self.grants.get_mut(grantee) {
                    Some(list) => {
                        list.retain(|g| &g.permission != permission);
                        list.is_empty()
                    }
                    None => false,
                };
                if now_empty {
                    self.grants.remove(grantee);
                }
            }
            DdlOperation::TransferOwnership { project, new_owner } => {
                self.owners.insert(project.clone(), new_owner.clone());
            }
            DdlOperation::CreateProject { .. }
            | DdlOperation::CreateScope { .. }
            | DdlOperation::CreateTable { .. }
            | DdlOperation::DropTable { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_read(scope: Option<&str>, prefix: Option<&[u8]>) -> Permission {
        Permission::KvRead {
            project: "p".into(),
            scope: scope.map(Into::into),
            prefix: prefix.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn coverage_is_scoped() {
        let wide = kv_read(None, None);
        let narrow = kv_read(Some("s"), Some(b"user/"));
        assert!(wide.covers(&narrow));
        assert!(!narrow.covers(&wide));
        assert!(narrow.covers(&kv_read(Some("s"), Some(b"user/42"))));
        assert!(!narrow.covers(&kv_read(Some("s"), Some(b"admin/1"))));
        assert!(!narrow.covers(&kv_read(Some("t"), Some(b"user/42"))));
        let write = Permission::KvWrite {
            project: "p".into(),
            scope: None,
            prefix: None,
        };
        assert!(!write.covers(&wide), "write does not imply read");
        let sa = Permission::ScopeAdmin {
            project: "p".into(),
            scope: "s".into(),
        };
        assert!(sa.covers(&narrow));
        assert!(!sa.covers(&kv_read(Some("t"), None)));
        assert!(!sa.covers(&wide), "an unscoped read reaches other scopes");
    }
}
