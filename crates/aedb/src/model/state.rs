//! The versioned in-memory state. Persistent (structurally shared) maps make a
//! snapshot an O(1) clone, so readers never block writers and vice versa.

use std::sync::Arc;

use imbl::{OrdMap, Vector};

use crate::audit::{
    ASSERTION_AUDIT, AUDIT_SCOPE, AUTHZ_AUDIT, AuditRow, SYSTEM_PROJECT, assertion_schema,
    authz_schema,
};
use crate::authz::{AuthzState, Permission};
use crate::error::{AedbError, NotFoundKind};
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::value::{Row, TableSchema};
use crate::record::{DdlOperation, WalRecord, WriteOp};
use crate::tableset::{Space, Stored, TableSet};

/// One key's latest write. `value: None` is a tombstone kept so that a concurrent
/// transaction that read the key before the delete still sees a write-write conflict.
#[derive(Clone, Debug)]
pub(crate) struct Versioned<T> {
    pub version: u64,
    pub value: Option<T>,
}

/// Equal when written by the same commit: one commit writes a key once, so the
/// version names the value (what a flush's diff against the last one needs).
impl<T> PartialEq for Versioned<T> {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.value.is_some() == other.value.is_some()
    }
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
    /// Every delete in the order applied (so by version), until `purge_tombstones`
    /// takes it off the front. An entry whose key was written again since is
    /// skipped then; each delete is visited once.
    pub deletes: Vector<(u64, Deleted)>,
}

/// Where a delete left its tombstone.
#[derive(Clone, Debug)]
pub(crate) enum Deleted {
    Kv {
        scope: String,
        key: Bytes,
    },
    Row {
        scope: String,
        table: String,
        key: Bytes,
    },
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DbState {
    /// Sequence number (= WAL LSN) of the last applied commit.
    pub seq: u64,
    pub projects: OrdMap<String, ProjectState>,
    pub authz: AuthzState,
    /// The table files beneath the maps (which are the memtable); see `tableset`.
    pub tables: Arc<TableSet>,
}

fn missing(kind: NotFoundKind, name: &str) -> AedbError {
    AedbError::NotFound {
        kind,
        name: name.to_string(),
    }
}

impl DbState {
    fn project_mut(&mut self, project: &str) -> Result<&mut ProjectState, AedbError> {
        self.projects
            .get_mut(project)
            .ok_or_else(|| missing(NotFoundKind::Project, project))
    }

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
        let tables = Arc::clone(&self.tables);
        for r in rows {
            let t = self
                .projects
                .get_mut(SYSTEM_PROJECT)
                .and_then(|p| p.scopes.get_mut(AUDIT_SCOPE))
                .and_then(|s| s.tables.get_mut(&r.table))
                .ok_or_else(|| {
                    missing(
                        NotFoundKind::Table,
                        &format!("{SYSTEM_PROJECT}/{AUDIT_SCOPE}/{}", r.table),
                    )
                })?;
            // A logged row that does not fit its table is an inconsistent log,
            // not a reason to index out of bounds.
            t.schema.check_row(&r.table, &r.row)?;
            let key = Bytes::from(t.schema.row_key(&r.row));
            let prev = t.rows.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: Some(r.row.clone()),
                },
            );
            let prefix =
                || crate::lsm::keyspace_prefix(SYSTEM_PROJECT, AUDIT_SCOPE, Some(&r.table));
            if !was_live(prev, &tables, prefix, t.created_seq, &key)? {
                t.live_rows += 1;
            }
        }
        Ok(())
    }

    /// `ProjectState::purge_tombstones` for every project, never past what the
    /// tables hold (`TableSet::purge_cap`).
    pub fn purge_tombstones(&mut self, horizon: u64) -> usize {
        let horizon = self.tables.purge_cap(horizon);
        let names: Vec<String> = self
            .projects
            .iter()
            .filter(|(_, p)| !p.deletes.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        let mut removed = 0;
        for n in &names {
            if let Some(p) = self.projects.get_mut(n) {
                removed += p.purge_tombstones(horizon);
            }
        }
        removed
    }

    /// Deleted keys and rows the memtable still holds as tombstones (a walk of
    /// the memtable: the live counts include entries only the tables hold).
    pub fn tombstones(&self) -> usize {
        self.projects
            .values()
            .flat_map(|p| p.scopes.values())
            .map(|s| {
                s.kv.values().filter(|e| e.value.is_none()).count()
                    + s.tables
                        .values()
                        .map(|t| t.rows.values().filter(|e| e.value.is_none()).count())
                        .sum::<usize>()
            })
            .sum()
    }

    pub fn scope(&self, project: &str, scope: &str) -> Result<&ScopeState, AedbError> {
        self.projects
            .get(project)
            .ok_or_else(|| missing(NotFoundKind::Project, project))?
            .scopes
            .get(scope)
            .ok_or_else(|| missing(NotFoundKind::Scope, &format!("{project}/{scope}")))
    }

    pub fn table(&self, project: &str, scope: &str, table: &str) -> Result<&TableState, AedbError> {
        self.scope(project, scope)?
            .tables
            .get(table)
            .ok_or_else(|| missing(NotFoundKind::Table, &format!("{project}/{scope}/{table}")))
    }

    /// Applies one logged record at `seq`, all or nothing. Every check that can fail
    /// here has already passed at commit time; during replay a failure means the log
    /// is inconsistent, and permissive recovery keeps the state before the record.
    pub fn apply(&mut self, record: &WalRecord, seq: u64) -> Result<(), AedbError> {
        // An O(1) clone (persistent maps): the record's first writes must not stay
        // behind when a later one fails.
        let mut next = self.clone();
        next.apply_in_place(record, seq)?;
        *self = next;
        Ok(())
    }

    fn apply_in_place(&mut self, record: &WalRecord, seq: u64) -> Result<(), AedbError> {
        match record {
            WalRecord::Commit {
                project,
                ops,
                audit,
                ..
            } => {
                let tables = Arc::clone(&self.tables);
                self.project_mut(project)?
                    .apply_ops(project, ops, seq, &tables)?;
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
                    return Err(missing(NotFoundKind::Project, project));
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
                let p = self.project_mut(project)?;
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
                let s = scope_mut(self.project_mut(project)?, project, scope)?;
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
                let s = scope_mut(self.project_mut(project)?, project, scope)?;
                s.tables.remove(table).ok_or_else(|| {
                    missing(NotFoundKind::Table, &format!("{project}/{scope}/{table}"))
                })?;
            }
        }
        Ok(())
    }
}

impl ProjectState {
    /// Drops the tombstones of deletes at or before `horizon`: no transaction that
    /// can still commit has a snapshot older than that, so none could conflict on
    /// them any more. Readers never see tombstones, so this changes nothing they
    /// read. Returns how many were removed.
    pub(crate) fn purge_tombstones(&mut self, horizon: u64) -> usize {
        let mut removed = 0;
        while self.deletes.front().is_some_and(|(v, _)| *v <= horizon) {
            let Some((version, deleted)) = self.deletes.pop_front() else {
                break;
            };
            match deleted {
                Deleted::Kv { scope, key } => {
                    if let Some(s) = self.scopes.get_mut(&scope)
                        && is_tombstone(s.kv.get(&key), version)
                    {
                        s.kv.remove(&key);
                        removed += 1;
                    }
                }
                Deleted::Row { scope, table, key } => {
                    if let Some(t) = self
                        .scopes
                        .get_mut(&scope)
                        .and_then(|s| s.tables.get_mut(&table))
                        && is_tombstone(t.rows.get(&key), version)
                    {
                        t.rows.remove(&key);
                        removed += 1;
                    }
                }
            }
        }
        removed
    }

    /// Applies a commit's writes at `seq` (the engine validated them first).
    /// `tables` are the ones beneath this project's maps: a write of a key the
    /// maps lack looks there to keep the live counts.
    pub(crate) fn apply_ops(
        &mut self,
        project: &str,
        ops: &[WriteOp],
        seq: u64,
        tables: &TableSet,
    ) -> Result<(), AedbError> {
        for op in ops {
            apply_op(self, project, op, seq, tables)?;
        }
        Ok(())
    }
}

/// Whether `key` held a live value before a write that replaced `prev` (the
/// memtable's entry): that entry, or the tables' when the memtable had none.
fn was_live<V: Stored>(
    prev: Option<Versioned<V>>,
    tables: &TableSet,
    prefix: impl FnOnce() -> Vec<u8>,
    min_seq: u64,
    key: &[u8],
) -> Result<bool, AedbError> {
    if let Some(e) = prev {
        return Ok(e.value.is_some());
    }
    if tables.is_empty() {
        return Ok(false);
    }
    Space::<V> {
        mem: &OrdMap::new(),
        tables,
        prefix: prefix(),
        seq: u64::MAX,
        min_seq,
    }
    .is_live(key)
}

fn apply_op(
    p: &mut ProjectState,
    project: &str,
    op: &WriteOp,
    seq: u64,
    tables: &TableSet,
) -> Result<(), AedbError> {
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
            let prefix = || crate::lsm::keyspace_prefix(project, scope, None);
            if !was_live(prev, tables, prefix, 0, key)? {
                s.live_keys += 1;
            }
        }
        WriteOp::KvDel { scope, key } => {
            p.deletes.push_back((
                seq,
                Deleted::Kv {
                    scope: scope.clone(),
                    key: key.clone(),
                },
            ));
            let s = scope_mut(p, project, scope)?;
            let prev = s.kv.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: None,
                },
            );
            let prefix = || crate::lsm::keyspace_prefix(project, scope, None);
            if was_live(prev, tables, prefix, 0, key)? {
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
            let prefix = || crate::lsm::keyspace_prefix(project, scope, Some(table));
            if !was_live(prev, tables, prefix, t.created_seq, key)? {
                t.live_rows += 1;
            }
        }
        WriteOp::RowDel { scope, table, key } => {
            p.deletes.push_back((
                seq,
                Deleted::Row {
                    scope: scope.clone(),
                    table: table.clone(),
                    key: key.clone(),
                },
            ));
            let t = table_mut(p, project, scope, table)?;
            let prev = t.rows.insert(
                key.clone(),
                Versioned {
                    version: seq,
                    value: None,
                },
            );
            let prefix = || crate::lsm::keyspace_prefix(project, scope, Some(table));
            if was_live(prev, tables, prefix, t.created_seq, key)? {
                t.live_rows -= 1;
            }
        }
    }
    Ok(())
}

/// True when `e` is still the tombstone written at `version`.
fn is_tombstone<T>(e: Option<&Versioned<T>>, version: u64) -> bool {
    e.is_some_and(|e| e.version == version && e.value.is_none())
}

fn scope_mut<'a>(
    p: &'a mut ProjectState,
    project: &str,
    scope: &str,
) -> Result<&'a mut ScopeState, AedbError> {
    p.scopes
        .get_mut(scope)
        .ok_or_else(|| missing(NotFoundKind::Scope, &format!("{project}/{scope}")))
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
        .ok_or_else(|| missing(NotFoundKind::Table, &format!("{project}/{scope}/{table}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_set(scope: &str, key: &[u8]) -> WriteOp {
        WriteOp::KvSet {
            scope: scope.to_string(),
            key: Bytes::from(key),
            value: SharedBytes::from(&b"v"[..]),
        }
    }

    fn base() -> DbState {
        let mut s = DbState::initial();
        let ddl = WalRecord::Ddl {
            actor: None,
            ops: vec![
                DdlOperation::CreateProject {
                    project: "p".into(),
                    owner: None,
                },
                DdlOperation::CreateScope {
                    project: "p".into(),
                    scope: "s".into(),
                },
            ],
            audit: Vec::new(),
        };
        s.apply(&ddl, 1).expect("base");
        s
    }

    /// Issue #13, bug 10: permissive replay keeps the state before a frame that
    /// does not apply, so that frame must leave no trace, not its first writes.
    #[test]
    fn a_commit_that_fails_halfway_changes_nothing() {
        let mut s = base();
        let rec = WalRecord::Commit {
            project: "p".into(),
            ops: vec![kv_set("s", b"first"), kv_set("missing", b"second")],
            idempotency: None,
            audit: Vec::new(),
        };
        assert!(s.apply(&rec, 2).is_err());
        assert_eq!(s.seq, 1);
        let scope = s.scope("p", "s").expect("scope");
        assert!(scope.kv.get(&b"first"[..]).is_none());
        assert_eq!(scope.live_keys, 0);
    }

    #[test]
    fn a_ddl_batch_that_fails_halfway_changes_nothing() {
        let mut s = base();
        let create = |scope: &str| DdlOperation::CreateScope {
            project: "p".into(),
            scope: scope.into(),
        };
        let rec = WalRecord::Ddl {
            actor: None,
            ops: vec![create("t"), create("s")],
            audit: Vec::new(),
        };
        assert!(s.apply(&rec, 2).is_err());
        assert_eq!(s.seq, 1);
        assert!(s.scope("p", "t").is_err());
    }
}
