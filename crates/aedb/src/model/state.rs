//! The versioned in-memory state. Persistent (structurally shared) maps make a
//! snapshot an O(1) clone, so readers never block writers and vice versa.

use std::sync::Arc;

use imbl::OrdMap;

use crate::error::AedbError;
use crate::model::bytes::Bytes;
use crate::model::value::{Row, TableSchema};
use crate::record::{DdlOp, WalRecord, WriteOp};

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
    pub kv: OrdMap<Bytes, Versioned<Bytes>>,
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
}

fn missing(kind: &'static str, name: &str) -> AedbError {
    AedbError::NotFound {
        kind,
        name: name.to_string(),
    }
}

impl DbState {
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
            WalRecord::Commit { project, ops, .. } => {
                let p = self
                    .projects
                    .get_mut(project)
                    .ok_or_else(|| missing("project", project))?;
                for op in ops {
                    apply_op(p, project, op, seq)?;
                }
            }
            WalRecord::Ddl(op) => self.apply_ddl(op, seq)?,
        }
        self.seq = seq;
        Ok(())
    }

    fn apply_ddl(&mut self, op: &DdlOp, seq: u64) -> Result<(), AedbError> {
        match op {
            DdlOp::CreateProject { project } => {
                if self.projects.contains_key(project) {
                    return Err(AedbError::AlreadyExists {
                        kind: "project",
                        name: project.clone(),
                    });
                }
                self.projects
                    .insert(project.clone(), ProjectState::default());
            }
            DdlOp::CreateScope { project, scope } => {
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
            DdlOp::CreateTable {
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
            DdlOp::DropTable {
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
