//! The versioned in-memory state. Persistent (structurally shared) maps make a
//! snapshot an O(1) clone, so readers never block writers and vice versa.

use std::sync::Arc;

use imbl::OrdMap;

use crate::audit::{
    ASSERTION_AUDIT, AUDIT_SCOPE, AUTHZ_AUDIT, AuditRow, SYSTEM_PROJECT, assertion_schema,
    authz_schema,
};
use crate::authz::{AuthzState, Permission};
use crate::error::AedbError;
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::value::{Row, TableSchema};
use crate::record::{DdlOperation, WalRecord, WriteOp};

/// One key's latest write. `value: None` is a tombstone kept so that a concurrent
/// transaction that read the key before the delete still sees a write-write conflict.
#[derive(Clone, Debug)]
pub(crate) struct Versioned<T> {
    pub version: u64,
    pub value: Option<T>,
}

#[derive(Clone, Debug)]
pub(crate) struct TableState {
    pub schema: Arc<TableSchema>,
    /// Commit that created the table; a transaction built against another
    /// incarnation of the same name is rejected.
    pub created_seq: u64,
    pub rows: OrdMap<Bytes, Versioned<Arc<Row>>>,
    pub live_rows: usize,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ScopeState {
    pub kv: OrdMap<Bytes, Versioned<SharedBytes>>,
    pub live_keys: usize,
    pub tables: OrdMap<String, TableState>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct ProjectState {
    pub scopes: OrdMap<String, ScopeState>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DbState {
    /// Sequence number (= WAL LSN) of the last applied commit.
    pub seq: u64,
    pub projects: OrdMap<String, ProjectState>,
    pub authz: AuthzState,
}

fn missing(kind: &'static str, name: &str) -> AedbError {
    AedbError::NotFound {
        kind,
        name: name.to_string(),
    }
}

impl DbState {
    /// A new database: empty but for the system audit tables.
    pub fn initial() -> Self {
        let mut audit = ScopeState::default();
        for (name, schema) in [
            (AUTHZ_AUDIT, authz_schema()),
            (ASSERTION_AUDIT, assertion_schema()),
        ] {
            audit.tables.insert(
                name.to_string(),
                TableState {
                    schema: Arc::new(schema),
                    created_seq: 0,
                    rows: OrdMap::new(),
                    live_rows: 0,
                },
            );
        }
        let mut system = ProjectState::default();
        system.scopes.insert(AUDIT_SCOPE.to_string(), audit);
        let mut s = Self::default();
        s.projects.insert(SYSTEM_PROJECT.to_string(), system);
        s
    }

    pub(crate) fn append_audit(&mut self, rows: &[AuditRow], seq: u64) -> Result<(), AedbError> {
        for r in rows {
            let t = self
                .projects
                .get_mut(SYSTEM_PROJECT)
                .and_then(|p| p.scopes.get_mut(AUDIT_SCOPE))
                .and_then(|s| s.tables.get_mut(&r.table))
                .ok_or_else(|| {
                    missing(
                        "table",
                        &format!("{SYSTEM_PROJECT}/{AUDIT_SCOPE}/{}", r.table),
                    )
                })?;
            // A logged row that does not fit its table is an inconsistent log,
            // not a reason to index out of bounds.
            t.schema.check_row(&r.table, &r.row)?;
            let key = Bytes::from(t.schema.row_key(&r.row));
            let prev = t.rows.insert(
                key,
                Versioned {
                    version: seq,
                    value: Some(r.row.clone()),
                },
            );
            if !matches!(prev, Some(Versioned { value: Some(_), .. })) {
                t.live_rows += 1;
            }
        }
        Ok(())
    }

    pub fn scope(&self, project: &str, scope: &str) -> Result<&ScopeState, AedbError> {
        self.projects
            .get(project)
            .ok_or_else(|| missing("project", project))?
            .scopes
            .get(scope)
            .ok_or_else(|| missing("scope", &format!("{project}/{scope}")))
    }

    pub fn table(&self, project: &str, scope: &str, table: &str) -> Result<&TableState, AedbError> {
        self.scope(project, scope)?
            .tables
            .get(table)
            .ok_or_else(|| missing("table", &format!("{project}/{scope}/{table}")))
    }

    /// Applies one logged record at `seq`. Every check that can fail here has already
    /// passed at commit time; during replay a failure means the log is inconsistent.
    pub fn apply(&mut self, record: &WalRecord, seq: u64) -> Result<(), AedbError> {
        match record {
            WalRecord::Commit {
                project,
                ops,
                audit,
                ..
            } => {
                self.projects
                    .get_mut(project)
                    .ok_or_else(|| missing("project", project))?
                    .apply_ops(project, ops, seq)?;
                self.append_audit(audit, seq)?;
            }
            WalRecord::Ddl { actor, ops, audit } => {
                for op in ops {
                    self.apply_ddl(op, actor.as_deref(), seq)?;
                }
                self.append_audit(audit, seq)?;
            }
            WalRecord::Bootstrap { admin, audit } => {
                if self.authz.bootstrapped {
                    return Err(AedbError::InvalidArgument(
                        "a GlobalAdmin was already bootstrapped".into(),
                    ));
                }
                self.authz.bootstrapped = true;
                self.authz.generation += 1;
                self.authz.apply(
                    &DdlOperation::GrantPermission {
                        grantee: admin.clone(),
                        permission: Permission::GlobalAdmin,
                        delegable: true,
                    },
                    "bootstrap",
                    seq,
                );
                self.append_audit(audit, seq)?;
            }
            WalRecord::Audit { rows } => self.append_audit(rows, seq)?,
        }
        self.seq = seq;
        Ok(())
    }

    fn apply_ddl(
        &mut self,
        op: &DdlOperation,
        actor: Option<&str>,
        seq: u64,
    ) -> Result<(), AedbError> {
        match op {
            DdlOperation::GrantPermission { .. } | DdlOperation::RevokePermission { .. } => {
                self.authz.apply(op, actor.unwrap_or("anonymous"), seq);
            }
            DdlOperation::TransferOwnership { project, .. } => {
                if !self.projects.contains_key(project) {
                    return Err(missing("project", project));
                }
                self.authz.apply(op, actor.unwrap_or("anonymous"), seq);
            }
            DdlOperation::CreateProject { project, owner } => {
                if self.projects.contains_key(project) {
                    return Err(AedbError::AlreadyExists {
                        kind: "project",
                        name: project.clone(),
                    });
                }
                self.projects
                    .insert(project.clone(), ProjectState::default());
                if let Some(owner) = owner {
                    self.authz.owners.insert(project.clone(), owner.clone());
                    self.authz.generation += 1;
                }
            }
            DdlOperation::CreateScope { project, scope } => {
                let p = self
                    .projects
                    .get_mut(project)
                    .ok_or_else(|| missing("project", project))?;
                if p.scopes.contains_key(scope) {
                    return Err(AedbError::AlreadyExists {
                        kind: "scope",
                        name: format!("{project}/{scope}"),
                    });
                }
                p.scopes.insert(scope.clone(), ScopeState::default());
            }
            DdlOperation::CreateTable {
                project,
                scope,
                table,
                schema,
            } => {
                let s = self
                    .projects
                    .get_mut(project)
                    .ok_or_else(|| missing("project", project))?
                    .scopes
                    .get_mut(scope)
                    .ok_or_else(|| missing("scope", &format!("{project}/{scope}")))?;
                if s.tables.contains_key(table) {
                    return Err(AedbError::AlreadyExists {
                        kind: "table",
                        name: format!("{project}/{scope}/{table}"),
                    });
                }
                s.tables.insert(
                    table.clone(),
                    TableState {
                        schema: Arc::new(schema.clone()),
                        created_seq: seq,
                        rows: OrdMap::new(),
                        live_rows: 0,
                    },
                );
            }
            DdlOperation::DropTable {
                project,
                scope,
                table,
            } => {
                let s = self
                    .projects
                    .get_mut(project)
                    .ok_or_else(|| missing("project", project))?
                    .scopes
                    .get_mut(scope)
                    .ok_or_else(|| missing("scope", &format!("{project}/{scope}")))?;
                s.tables
                    .remove(table)
                    .ok_or_else(|| missing("table", &format!("{project}/{scope}/{table}")))?;
            }
        }
        Ok(())
    }
}

impl ProjectState {
    /// Applies a commit's writes at `seq` (the engine validated them first).
    pub(crate) fn apply_ops(
        &mut self,
        project: &str,
        ops: &[WriteOp],
        seq: u64,
    ) -> Result<(), AedbError> {
        for op in ops {
            apply_op(self, project, op, seq)?;
        }
        Ok(())
    }
}

fn apply_op(p: &mut ProjectState, project: &str, op: &WriteOp, seq: u64) -> Result<(), AedbError> {
    match op {
        WriteOp::KvSet { scope, key, value } => {
            let s = scope_mut(p, project, scope)?;
            let prev = s.kv.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: Some(value.clone()),
                },
            );
            if !matches!(prev, Some(Versioned { value: Some(_), .. })) {
                s.live_keys += 1;
            }
        }
        WriteOp::KvDel { scope, key } => {
            let s = scope_mut(p, project, scope)?;
            let prev = s.kv.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: None,
                },
            );
            if matches!(prev, Some(Versioned { value: Some(_), .. })) {
                s.live_keys -= 1;
            }
        }
        WriteOp::RowPut {
            scope,
            table,
            key,
            row,
        } => {
            let t = table_mut(p, project, scope, table)?;
            // Checked at commit time; a logged row that does not fit its table, or
            // is logged under another key, is an inconsistent log (queries index
            // rows by column).
            t.schema.check_row(table, row)?;
            if t.schema.row_key(row).as_slice() != key.as_slice() {
                return Err(AedbError::Schema {
                    table: table.clone(),
                    reason: "logged row key is not the row's primary key".into(),
                });
            }
            let prev = t.rows.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: Some(row.clone()),
                },
            );
            if !matches!(prev, Some(Versioned { value: Some(_), .. })) {
                t.live_rows += 1;
            }
        }
        WriteOp::RowDel { scope, table, key } => {
            let t = table_mut(p, project, scope, table)?;
            let prev = t.rows.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: None,
                },
            );
            if matches!(prev, Some(Versioned { value: Some(_), .. })) {
                t.live_rows -= 1;
            }
        }
    }
    Ok(())
}

fn scope_mut<'a>(
    p: &'a mut ProjectState,
    project: &str,
    scope: &str,
) -> Result<&'a mut ScopeState, AedbError> {
    p.scopes
        .get_mut(scope)
        .ok_or_else(|| missing("scope", &format!("{project}/{scope}")))
}

fn table_mut<'a>(
    p: &'a mut ProjectState,
    project: &str,
    scope: &str,
    table: &str,
) -> Result<&'a mut TableState, AedbError> {
    scope_mut(p, project, scope)?
        .tables
        .get_mut(table)
        .ok_or_else(|| missing("table", &format!("{project}/{scope}/{table}")))
}
