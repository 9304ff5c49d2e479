//! System audit tables `authz_audit` and `assertion_audit`, each a hash chain.
//!
//! They live in the reserved project `_system`, scope `audit`, as ordinary tables
//! (readable through the normal query API by callers with `AuditRead`). Each row
//! carries `prev_hash` and `row_hash` = SHA-256(prev_hash || postcard(other columns)),
//! so an exported copy with its chain head proves later that no row was removed,
//! altered or reordered. Rows are written in the same WAL record as the change they
//! record (grants, GlobalAdmin use), so neither can exist without the other.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AedbError;
use crate::model::state::DbState;
use crate::model::value::{Column, ColumnType, Row, TableSchema, Value};
use crate::txn::snapshot::{TableView, table_view};

pub const SYSTEM_PROJECT: &str = "_system";
pub const AUDIT_SCOPE: &str = "audit";
pub const AUTHZ_AUDIT: &str = "authz_audit";
pub const ASSERTION_AUDIT: &str = "assertion_audit";

/// One audit event, before it is chained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum AuditEvent {
    /// `authz_audit`: grant, revoke, ownership change, bootstrap, GlobalAdmin use.
    Authz {
        actor: String,
        action: String,
        /// What was granted/revoked/used, e.g. `KvRead(p/s)` or the operation.
        permission: String,
        /// Grantee, new owner, or the operation's target.
        target: String,
        delegable: bool,
        outcome: String,
    },
    /// `assertion_audit`: failed assertions and policy enforcement failures.
    Assertion {
        actor: String,
        project: String,
        kind: String,
        detail: String,
        expected: String,
        actual: String,
    },
}

fn col(name: &str, ty: ColumnType) -> Column {
    Column::new(name, ty)
}

pub(crate) fn authz_schema() -> TableSchema {
    TableSchema::new(
        vec![
            col("id", ColumnType::Int),
            col("at", ColumnType::Timestamp),
            col("commit_seq", ColumnType::Int),
            col("actor", ColumnType::Text),
            col("action", ColumnType::Text),
            col("permission", ColumnType::Text),
            col("target", ColumnType::Text),
            col("delegable", ColumnType::Bool),
            col("outcome", ColumnType::Text),
            col("prev_hash", ColumnType::Bytes),
            col("row_hash", ColumnType::Bytes),
        ],
        vec!["id".into()],
    )
}

pub(crate) fn assertion_schema() -> TableSchema {
    TableSchema::new(
        vec![
            col("id", ColumnType::Int),
            col("at", ColumnType::Timestamp),
            col("commit_seq", ColumnType::Int),
            col("actor", ColumnType::Text),
            col("project", ColumnType::Text),
            col("kind", ColumnType::Text),
            col("detail", ColumnType::Text),
            col("expected", ColumnType::Text),
            col("actual", ColumnType::Text),
            col("prev_hash", ColumnType::Bytes),
            col("row_hash", ColumnType::Bytes),
        ],
        vec!["id".into()],
    )
}

impl AuditEvent {
    pub fn table(&self) -> &'static str {
        match self {
            AuditEvent::Authz { .. } => AUTHZ_AUDIT,
            AuditEvent::Assertion { .. } => ASSERTION_AUDIT,
        }
    }

    /// The row's columns before the two hash columns.
    fn body(&self, id: i64, at: i64, commit_seq: u64) -> Row {
        let mut r = vec![
            Value::Int(id),
            Value::Timestamp(at),
            Value::Int(commit_seq as i64),
        ];
        match self {
            AuditEvent::Authz {
                actor,
                action,
                permission,
                target,
                delegable,
                outcome,
            } => r.extend([
                Value::Text(actor.clone()),
                Value::Text(action.clone()),
                Value::Text(permission.clone()),
                Value::Text(target.clone()),
                Value::Bool(*delegable),
                Value::Text(outcome.clone()),
            ]),
            AuditEvent::Assertion {
                actor,
                project,
                kind,
                detail,
                expected,
                actual,
            } => r.extend([
                Value::Text(actor.clone()),
                Value::Text(project.clone()),
                Value::Text(kind.clone()),
                Value::Text(detail.clone()),
                Value::Text(expected.clone()),
                Value::Text(actual.clone()),
            ]),
        }
        r
    }
}

/// A chained row ready to be logged and applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct AuditRow {
    pub table: String,
    pub row: Arc<Row>,
}

pub(crate) fn row_hash(prev: &[u8], body: &[Value]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(postcard::to_stdvec(body).unwrap_or_default());
    h.finalize().into()
}

/// The last (id, row_hash) of an audit table, or (0, zeros) when empty.
fn tail(t: &TableView<'_>) -> Result<(i64, Vec<u8>), AedbError> {
    let last = t.last_row()?;
    Ok(match last.as_deref() {
        Some(row) => match (&row[0], row.last()) {
            (Value::Int(id), Some(Value::Bytes(h))) => (*id, h.clone()),
            _ => (0, vec![0; 32]),
        },
        None => (0, vec![0; 32]),
    })
}

/// Chains `events` after the current tails of their tables in `state`.
pub(crate) fn chain_rows(
    state: &DbState,
    events: &[AuditEvent],
    commit_seq: u64,
    at: i64,
) -> Result<Vec<AuditRow>, AedbError> {
    let mut tails: Vec<(&'static str, (i64, Vec<u8>))> = Vec::new();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let table = e.table();
        let idx = match tails.iter().position(|(t, _)| *t == table) {
            Some(i) => i,
            None => {
                let t = match table_view(state, SYSTEM_PROJECT, AUDIT_SCOPE, table) {
                    Ok(t) => tail(&t)?,
                    Err(_) => (0, vec![0; 32]),
                };
                tails.push((table, t));
                tails.len() - 1
            }
        };
        let (last_id, prev) = &mut tails[idx].1;
        *last_id += 1;
        let mut row = e.body(*last_id, at, commit_seq);
        let h = row_hash(prev, &row);
        row.push(Value::Bytes(prev.clone()));
        row.push(Value::Bytes(h.to_vec()));
        *prev = h.to_vec();
        out.push(AuditRow {
            table: table.to_string(),
            row: Arc::new(row),
        });
    }
    Ok(out)
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Rows of one audit table from `since_id` on, with the chain head at export time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditExport {
    pub table: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// `row_hash` of the table's last row when exported (hex).
    pub chain_head: String,
    pub exported_at: i64,
}

/// Why an export (or a live table) fails verification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditVerifyError {
    #[error("{table}: row {position} has a malformed layout")]
    Malformed { table: String, position: usize },
    #[error("{table}: row id {id} does not follow id {previous} (row removed or reordered)")]
    Gap {
        table: String,
        id: i64,
        previous: i64,
    },
    #[error("{table}: row id {id} does not link to the previous row's hash (removed or reordered)")]
    BrokenLink { table: String, id: i64 },
    #[error("{table}: row id {id} was altered (its hash does not match its contents)")]
    Altered { table: String, id: i64 },
    #[error(
        "{table}: the last row's hash does not match the recorded chain head (rows removed at the end)"
    )]
    HeadMismatch { table: String },
    /// A live table's rows could not be read from the table files (I/O or a
    /// block failing authentication): nothing was verified.
    #[error("{table}: rows unreadable: {reason}")]
    Unreadable { table: String, reason: String },
}

/// Verifies a sequence of rows (each: body columns, prev_hash, row_hash).
pub(crate) fn verify_rows(
    table: &str,
    rows: &[Vec<Value>],
    chain_head: Option<&str>,
) -> Result<(), AuditVerifyError> {
    let mut prev: Option<(i64, Vec<u8>)> = None;
    for (position, row) in rows.iter().enumerate() {
        let malformed = || AuditVerifyError::Malformed {
            table: table.to_string(),
            position,
        };
        if row.len() < 3 {
            return Err(malformed());
        }
        let n = row.len();
        let (Value::Int(id), Value::Bytes(p), Value::Bytes(h)) =
            (&row[0], &row[n - 2], &row[n - 1])
        else {
            return Err(malformed());
        };
        if let Some((pid, ph)) = &prev {
            if *id != pid + 1 {
                return Err(AuditVerifyError::Gap {
                    table: table.to_string(),
                    id: *id,
                    previous: *pid,
                });
            }
            if p != ph {
                return Err(AuditVerifyError::BrokenLink {
                    table: table.to_string(),
                    id: *id,
                });
            }
        } else if *id == 1 && p.iter().any(|&b| b != 0) {
            return Err(AuditVerifyError::BrokenLink {
                table: table.to_string(),
                id: *id,
            });
        }
        if row_hash(p, &row[..n - 2]).as_slice() != h.as_slice() {
            return Err(AuditVerifyError::Altered {
                table: table.to_string(),
                id: *id,
            });
        }
        prev = Some((*id, h.clone()));
    }
    if let Some(head) = chain_head {
        let last = prev.map(|(_, h)| hex::encode(h)).unwrap_or_default();
        if !head.is_empty() && last != head {
            return Err(AuditVerifyError::HeadMismatch {
                table: table.to_string(),
            });
        }
    }
    Ok(())
}

/// Verifies an export on its own: links, hashes and the chain head.
pub fn verify_audit_export(export: &AuditExport) -> Result<(), AuditVerifyError> {
    verify_rows(&export.table, &export.rows, Some(&export.chain_head))
}

/// Exports both audit tables of `state` from row id `since_id` on.
pub(crate) fn export_tables(state: &DbState, since_id: i64) -> Result<Vec<AuditExport>, AedbError> {
    let mut out = Vec::new();
    for table in [AUTHZ_AUDIT, ASSERTION_AUDIT] {
        let Ok(t) = table_view(state, SYSTEM_PROJECT, AUDIT_SCOPE, table) else {
            continue;
        };
        let live: Vec<Arc<Row>> = t
            .rows()
            .map(|r| r.map(|(_, e)| e.value))
            .filter_map(Result::transpose)
            .collect::<Result<_, _>>()?;
        let rows: Vec<Vec<Value>> = live
            .iter()
            .filter(|r| matches!(r.first(), Some(Value::Int(id)) if *id >= since_id))
            .map(|r| r.to_vec())
            .collect();
        let chain_head = live
            .last()
            .and_then(|r| match r.last() {
                Some(Value::Bytes(h)) => Some(hex::encode(h)),
                _ => None,
            })
            .unwrap_or_default();
        out.push(AuditExport {
            table: table.to_string(),
            columns: t.schema().columns.iter().map(|c| c.name.clone()).collect(),
            rows,
            chain_head,
            exported_at: now_unix(),
        });
    }
    Ok(out)
}
