//! A write transaction: reads from its snapshot (plus its own writes), buffers
//! writes, and carries assertions and an optional idempotency key to commit.

use crate::tableset::{kv_space, row_space};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::authz::Permission;
use crate::config::Limits;
use crate::error::{AedbError, CommitError, ReadError};
use crate::instance::{BoundCaller, SnapshotPin};
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::state::DbState;
use crate::model::value::{Row, Value};
use crate::record::{IdempotencyTag, WalRecord, WriteOp};
use crate::txn::assertion::ReadAssertion;
use crate::txn::describe_key;
use crate::txn::snapshot::{KvPair, Snapshot, prefix_successor};

/// SHA-256 of what a commit writes, compared between attempts under one
/// idempotency key.
pub(crate) type WritesDigest = [u8; 32];

/// The digest of a commit record's project and operations as logged (so it is the
/// same whether computed at commit or from the log at open). Assertions are not
/// part of it: they are preconditions, not writes. `None` for other records.
pub(crate) fn writes_digest(record: &WalRecord) -> Option<WritesDigest> {
    use sha2::Digest;
    let WalRecord::Commit { project, ops, .. } = record else {
        return None;
    };
    let bytes = postcard::to_stdvec(&(project, ops)).ok()?;
    Some(sha2::Sha256::digest(&bytes).into())
}

/// A buffered row write and the table incarnation it was checked against.
#[derive(Clone, Debug)]
pub(crate) struct RowWrite {
    pub row: Option<Arc<Row>>,
    pub table_created_seq: u64,
}

/// Bytes a write adds to the transaction's frame besides key and value.
const OP_OVERHEAD: usize = 16;

/// Writes to one project, committed atomically by
/// [`crate::AedbInstance::commit`]. Dropping it without committing discards it.
#[derive(Debug)]
pub struct WriteTransaction {
    pub(crate) project: String,
    pub(crate) snapshot: Snapshot,
    pub(crate) kv: BTreeMap<(String, Bytes), Option<SharedBytes>>,
    pub(crate) rows: BTreeMap<(String, String, Bytes), RowWrite>,
    pub(crate) assertions: Vec<ReadAssertion>,
    pub(crate) idempotency_key: Option<String>,
    /// Set by `begin_write_as`: every read is then authorized for this caller when it
    /// happens, like a `ReadTx` read. `None` only on the anonymous development API.
    pub(crate) caller: Option<BoundCaller>,
    /// Keeps the tombstones this transaction may conflict with until it is dropped.
    pub(crate) pin: Option<SnapshotPin>,
    pub(crate) limits: Limits,
    bytes: usize,
}

impl WriteTransaction {
    pub(crate) fn new(project: String, snapshot: Snapshot, limits: Limits) -> Self {
        Self {
            project,
            snapshot,
            kv: BTreeMap::new(),
            rows: BTreeMap::new(),
            assertions: Vec::new(),
            idempotency_key: None,
            caller: None,
            pin: None,
            limits,
            bytes: 0,
        }
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// Sequence number of the snapshot this transaction reads from; a key written
    /// by a later commit makes this transaction's write to it a `Conflict`.
    pub fn snapshot_seq(&self) -> u64 {
        self.snapshot.seq()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty() && self.rows.is_empty()
    }

    /// The caller this transaction was begun for (`None`: anonymous).
    pub(crate) fn caller_id(&self) -> Option<&str> {
        self.caller.as_ref().map(BoundCaller::caller_id)
    }

    /// Authorizes a read before anything is looked at, own writes included: a
    /// write-only grant must not turn into reads of what the snapshot holds, and a
    /// denial must not tell whether the key, scope or table exists.
    fn authorize_read(&self, need: impl FnOnce() -> Permission) -> Result<(), ReadError> {
        match &self.caller {
            Some(c) => c
                .authorize_read(&self.project, need())
                .map_err(ReadError::narrow),
            None => Ok(()),
        }
    }

    fn state(&self) -> &DbState {
        &self.snapshot.state
    }

    fn charge(&mut self, extra: usize) -> Result<(), CommitError> {
        let ops = self.kv.len() + self.rows.len() + 1;
        if ops > self.limits.max_txn_ops {
            return Err(CommitError::LimitExceeded {
                what: "operations in one transaction",
                limit: self.limits.max_txn_ops,
                actual: ops,
            });
        }
        let bytes = self.bytes + extra + OP_OVERHEAD;
        if bytes > self.limits.max_txn_bytes {
            return Err(CommitError::LimitExceeded {
                what: "bytes in one transaction",
                limit: self.limits.max_txn_bytes,
                actual: bytes,
            });
        }
        self.bytes = bytes;
        Ok(())
    }

    fn check_key(&self, key: &[u8]) -> Result<(), CommitError> {
        if key.is_empty() {
            return Err(CommitError::InvalidArgument(
                "keys must not be empty".into(),
            ));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(CommitError::LimitExceeded {
                what: "key size in bytes",
                limit: self.limits.max_key_bytes,
                actual: key.len(),
            });
        }
        Ok(())
    }

    pub fn kv_set(&mut self, scope: &str, key: &[u8], value: &[u8]) -> Result<(), CommitError> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(CommitError::LimitExceeded {
                what: "value size in bytes",
                limit: self.limits.max_value_bytes,
                actual: value.len(),
            });
        }
        self.state()
            .scope(&self.project, scope)
            .map_err(CommitError::narrow)?;
        self.charge(scope.len() + key.len() + value.len())?;
        self.kv.insert(
            (scope.to_string(), Bytes::from(key)),
            Some(SharedBytes::from(value)),
        );
        Ok(())
    }

    pub fn kv_del(&mut self, scope: &str, key: &[u8]) -> Result<(), CommitError> {
        self.check_key(key)?;
        self.state()
            .scope(&self.project, scope)
            .map_err(CommitError::narrow)?;
        self.charge(scope.len() + key.len())?;
        self.kv.insert((scope.to_string(), Bytes::from(key)), None);
        Ok(())
    }

    /// Reads `key`, seeing this transaction's own writes first.
    pub fn kv_get(&self, scope: &str, key: &[u8]) -> Result<Option<Arc<[u8]>>, ReadError> {
        self.authorize_read(|| Permission::kv_read(&self.project, scope, Some(key)))?;
        if let Some(w) = self.kv.get(&(scope.to_string(), Bytes::from(key))) {
            return Ok(w.as_ref().map(SharedBytes::to_arc));
        }
        self.snapshot.kv(&self.project, scope)?.get(key)
    }

    /// Prefix scan over the snapshot merged with this transaction's writes.
    pub fn kv_scan_prefix(
        &self,
        scope: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.authorize_read(|| Permission::kv_read(&self.project, scope, Some(prefix)))?;
        let end = prefix_successor(prefix);
        let end = match &end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        self.scan_range_authorized(scope, Bound::Included(prefix), end, limit)
    }

    /// Range scan over the snapshot merged with this transaction's writes; needs
    /// read access to the whole scope (a range is not a prefix).
    pub fn kv_scan_range(
        &self,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        self.authorize_read(|| Permission::kv_read(&self.project, scope, None))?;
        self.scan_range_authorized(scope, start, end, limit)
    }

    fn scan_range_authorized(
        &self,
        scope: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        let view = self.snapshot.kv(&self.project, scope)?;
        let in_range = |k: &[u8]| {
            (match start {
                Bound::Included(s) => k >= s,
                Bound::Excluded(s) => k > s,
                Bound::Unbounded => true,
            }) && (match end {
                Bound::Included(e) => k <= e,
                Bound::Excluded(e) => k < e,
                Bound::Unbounded => true,
            })
        };
        // Own writes in range, then snapshot entries not shadowed by them.
        let mut merged: BTreeMap<Bytes, Option<Arc<[u8]>>> = self
            .kv
            .iter()
            .filter(|((s, k), _)| s == scope && in_range(k))
            .map(|((_, k), v)| (k.clone(), v.as_ref().map(SharedBytes::to_arc)))
            .collect();
        let own_deletes = merged.values().filter(|v| v.is_none()).count();
        for (k, v) in view.scan_range(start, end, limit.saturating_add(own_deletes))? {
            merged.entry(k).or_insert(Some(v));
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect())
    }

    /// Inserts or replaces the row with the same primary key.
    pub fn put_row(&mut self, scope: &str, table: &str, row: Row) -> Result<(), CommitError> {
        let t = self
            .state()
            .table(&self.project, scope, table)
            .map_err(CommitError::narrow)?;
        t.schema
            .check_row(table, &row)
            .map_err(CommitError::narrow)?;
        let key = t.schema.row_key(&row);
        self.check_key(&key)?;
        let created = t.created_seq;
        let size: usize = row.iter().map(Value::encoded_len_hint).sum();
        if size > self.limits.max_value_bytes {
            return Err(CommitError::LimitExceeded {
                what: "row size in bytes",
                limit: self.limits.max_value_bytes,
                actual: size,
            });
        }
        self.charge(scope.len() + table.len() + key.len() + size)?;
        self.rows.insert(
            (scope.to_string(), table.to_string(), Bytes::from(key)),
            RowWrite {
                row: Some(Arc::new(row)),
                table_created_seq: created,
            },
        );
        Ok(())
    }

    pub fn delete_row(
        &mut self,
        scope: &str,
        table: &str,
        pk: &[Value],
    ) -> Result<(), CommitError> {
        let t = self
            .state()
            .table(&self.project, scope, table)
            .map_err(CommitError::narrow)?;
        let key = t.schema.encode_pk(table, pk).map_err(CommitError::narrow)?;
        let created = t.created_seq;
        self.charge(scope.len() + table.len() + key.len())?;
        self.rows.insert(
            (scope.to_string(), table.to_string(), Bytes::from(key)),
            RowWrite {
                row: None,
                table_created_seq: created,
            },
        );
        Ok(())
    }

    /// Reads a row by primary key, seeing this transaction's own writes first.
    pub fn get_row(
        &self,
        scope: &str,
        table: &str,
        pk: &[Value],
    ) -> Result<Option<Arc<Row>>, ReadError> {
        self.authorize_read(|| Permission::table_read(&self.project, scope, table))?;
        let view = self.snapshot.table(&self.project, scope, table)?;
        let key = view
            .schema()
            .encode_pk(table, pk)
            .map_err(ReadError::narrow)?;
        if let Some(w) = self.rows.get(&(
            scope.to_string(),
            table.to_string(),
            Bytes::from(key.as_slice()),
        )) {
            return Ok(w.row.clone());
        }
        view.get(pk)
    }

    /// Adds a precondition; the commit fails with `AssertionFailed` naming the first
    /// one that does not hold at commit time.
    pub fn assert(&mut self, assertion: ReadAssertion) -> &mut Self {
        self.assertions.push(assertion);
        self
    }

    /// Makes the commit idempotent: a retry with the same key (from the same caller)
    /// returns the first commit's result instead of applying again.
    pub fn set_idempotency_key(&mut self, key: impl Into<String>) -> &mut Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub(crate) fn idempotency_tag(&self) -> Option<IdempotencyTag> {
        self.idempotency_key.as_ref().map(|k| IdempotencyTag {
            caller: self.caller_id().unwrap_or_default().to_string(),
            key: k.clone(),
        })
    }

    /// Checks write-write conflicts and table incarnations against the latest state.
    pub(crate) fn check_conflicts(&self, latest: &DbState) -> Result<(), AedbError> {
        let snap = self.snapshot.seq();
        for (scope, key) in self.kv.keys() {
            let s = kv_space(latest, &self.project, scope)?;
            if let Some(e) = s.get(key.as_slice())?
                && e.version > snap
            {
                return Err(AedbError::Conflict {
                    what: format!("key {} in {}/{scope}", describe_key(key), self.project),
                    snapshot_seq: snap,
                    committed_seq: e.version,
                });
            }
        }
        for ((scope, table, key), w) in &self.rows {
            let t = latest.table(&self.project, scope, table)?;
            if t.created_seq != w.table_created_seq {
                return Err(AedbError::Conflict {
                    what: format!(
                        "table {}/{scope}/{table} (dropped and recreated)",
                        self.project
                    ),
                    snapshot_seq: snap,
                    committed_seq: t.created_seq,
                });
            }
            if let Some(e) = row_space(latest, &self.project, scope, table)?.get(key.as_slice())?
                && e.version > snap
            {
                return Err(AedbError::Conflict {
                    what: format!(
                        "row {} in {}/{scope}/{table}",
                        describe_key(key),
                        self.project
                    ),
                    snapshot_seq: snap,
                    committed_seq: e.version,
                });
            }
        }
        Ok(())
    }

    /// Every permission this transaction needs: write access to each key and table
    /// it writes, read access to everything its assertions look at.
    pub(crate) fn required_permissions(&self) -> Vec<Permission> {
        let p = &self.project;
        let mut needs = std::collections::BTreeSet::new();
        for (scope, key) in self.kv.keys() {
            needs.insert(Permission::KvWrite {
                project: p.clone(),
                scope: Some(scope.clone()),
                prefix: Some(key.to_vec()),
            });
        }
        for (scope, table, _) in self.rows.keys() {
            needs.insert(Permission::TableWrite {
                project: p.clone(),
                scope: Some(scope.clone()),
                table: Some(table.clone()),
            });
        }
        for a in &self.assertions {
            a.read_needs(p, &mut needs);
        }
        needs.into_iter().collect()
    }

    pub(crate) fn check_assertions(&self, latest: &DbState) -> Result<(), AedbError> {
        for (index, a) in self.assertions.iter().enumerate() {
            if !a.eval(latest, &self.project)? {
                return Err(AedbError::AssertionFailed {
                    index,
                    description: a.describe(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn to_record(&self) -> WalRecord {
        let mut ops = Vec::with_capacity(self.kv.len() + self.rows.len());
        for ((scope, key), v) in &self.kv {
            ops.push(match v {
                Some(value) => WriteOp::KvSet {
                    scope: scope.clone(),
                    key: key.clone(),
                    value: value.clone(),
                },
                None => WriteOp::KvDel {
                    scope: scope.clone(),
                    key: key.clone(),
                },
            });
        }
        for ((scope, table, key), w) in &self.rows {
            ops.push(match &w.row {
                Some(row) => WriteOp::RowPut {
                    scope: scope.clone(),
                    table: table.clone(),
                    key: key.clone(),
                    row: row.clone(),
                },
                None => WriteOp::RowDel {
                    scope: scope.clone(),
                    table: table.clone(),
                    key: key.clone(),
                },
            });
        }
        WalRecord::Commit {
            project: self.project.clone(),
            ops,
            idempotency: self.idempotency_tag(),
            audit: Vec::new(),
        }
    }
}
