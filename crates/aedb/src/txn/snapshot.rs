//! Read-only views over one committed state.

use std::ops::Bound;
use std::sync::Arc;

use crate::error::{NotFoundKind, ReadError};
use crate::model::state::{DbState, ScopeState, TableState};
use crate::model::value::{Row, TableSchema, Value};
use crate::txn::query::{Query, QueryResult, run_query};

/// Which state a read transaction sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsistencyMode {
    /// The latest committed (visible) state.
    AtLatest,
    /// The state right after commit `n` (kept for the last `snapshot_history` commits).
    AtSeq(u64),
    /// The state captured by the last checkpoint.
    AtCheckpoint,
}

/// An immutable, consistent view of the database at one commit sequence number.
/// Cheap to clone and to hold: writers never wait for it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub(crate) state: Arc<DbState>,
}

/// A key (short keys stored inline: cloning one does not allocate) and its value.
pub type KvPair = (crate::model::bytes::Bytes, Arc<[u8]>);

/// A value and the sequence number of the commit that wrote it (its version).
pub type Versioned = (u64, Arc<[u8]>);

/// A key with its value and version (what `*_versioned` scans return).
pub type VersionedKvPair = (crate::model::bytes::Bytes, Versioned);

impl Snapshot {
    /// Sequence number of the last commit this snapshot includes.
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    pub fn kv<'a>(&'a self, project: &str, scope: &str) -> Result<KvView<'a>, ReadError> {
        Ok(KvView {
            scope: self
                .state
                .scope(project, scope)
                .map_err(ReadError::narrow)?,
        })
    }

    pub fn table<'a>(
        &'a self,
        project: &str,
        scope: &str,
        table: &str,
    ) -> Result<TableView<'a>, ReadError> {
        Ok(TableView {
            name: table.to_string(),
            table: self
                .state
                .table(project, scope, table)
                .map_err(ReadError::narrow)?,
        })
    }

    pub fn projects(&self) -> Vec<String> {
        self.state.projects.keys().cloned().collect()
    }

    pub fn scopes(&self, project: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .state
            .projects
            .get(project)
            .ok_or_else(|| ReadError::NotFound {
                kind: NotFoundKind::Project,
                name: project.to_string(),
            })?
            .scopes
            .keys()
            .cloned()
            .collect())
    }

    pub fn tables(&self, project: &str, scope: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .state
            .scope(project, scope)
            .map_err(ReadError::narrow)?
            .tables
            .keys()
            .cloned()
            .collect())
    }
}

/// The KV keyspace of one scope in a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    scope: &'a ScopeState,
}

impl KvView<'_> {
    pub fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        self.get_versioned(key).map(|(_, v)| v)
    }

    /// The value and the sequence number of the commit that wrote it.
    pub fn get_versioned(&self, key: &[u8]) -> Option<Versioned> {
        let e = self.scope.kv.get(key)?;
        e.value.as_ref().map(|v| (e.version, v.to_arc()))
    }

    /// Version of `key` (0 when absent or deleted).
    pub fn version(&self, key: &[u8]) -> u64 {
        match self.scope.kv.get(key) {
            Some(e) if e.value.is_some() => e.version,
            _ => 0,
        }
    }

    /// Live keys in this keyspace.
    pub fn len(&self) -> usize {
        self.scope.live_keys
    }

    pub fn is_empty(&self) -> bool {
        self.scope.live_keys == 0
    }

    /// Live entries with keys in the bounds, in key order, as (key, version, value).
    fn live(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> impl DoubleEndedIterator<Item = VersionedKvPair> + '_ {
        // imbl panics on an inverted range; an inverted range is simply empty.
        let range =
            (!bounds_empty(start, end)).then(|| self.scope.kv.range::<_, [u8]>((start, end)));
        range.into_iter().flatten().filter_map(|(k, e)| {
            e.value
                .as_ref()
                .map(|v| (k.clone(), (e.version, v.to_arc())))
        })
    }

    /// Up to `limit` pairs with keys in `[start, end)` (per the bounds), in key order.
    pub fn scan_range(&self, start: Bound<&[u8]>, end: Bound<&[u8]>, limit: usize) -> Vec<KvPair> {
        self.live(start, end)
            .map(|(k, (_, v))| (k, v))
            .take(limit)
            .collect()
    }

    /// `scan_range` with the version of each value.
    pub fn scan_range_versioned(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Vec<VersionedKvPair> {
        self.live(start, end).take(limit).collect()
    }

    /// Up to `limit` pairs with keys in `[start, end)` (per the bounds), in
    /// descending key order: the newest entries of a time-ordered keyspace first.
    pub fn scan_range_rev(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Vec<KvPair> {
        self.live(start, end)
            .rev()
            .map(|(k, (_, v))| (k, v))
            .take(limit)
            .collect()
    }

    /// `scan_range_rev` with the version of each value.
    pub fn scan_range_rev_versioned(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Vec<VersionedKvPair> {
        self.live(start, end).rev().take(limit).collect()
    }

    /// Up to `limit` pairs whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Vec<KvPair> {
        let end = prefix_successor(prefix);
        self.scan_range(Bound::Included(prefix), prefix_end(end.as_deref()), limit)
    }

    /// `scan_prefix` with the version of each value.
    pub fn scan_prefix_versioned(&self, prefix: &[u8], limit: usize) -> Vec<VersionedKvPair> {
        let end = prefix_successor(prefix);
        self.scan_range_versioned(Bound::Included(prefix), prefix_end(end.as_deref()), limit)
    }
}

fn prefix_end(successor: Option<&[u8]>) -> Bound<&[u8]> {
    successor.map_or(Bound::Unbounded, Bound::Excluded)
}

fn bounds_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

/// The smallest key greater than every key with this prefix (None: no such key).
pub(crate) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One table in a snapshot.
#[derive(Debug, Clone)]
pub struct TableView<'a> {
    name: String,
    table: &'a TableState,
}

impl TableView<'_> {
    pub fn schema(&self) -> &TableSchema {
        &self.table.schema
    }

    pub fn len(&self) -> usize {
        self.table.live_rows
    }

    pub fn is_empty(&self) -> bool {
        self.table.live_rows == 0
    }

    /// The row with primary key `pk` (values in primary-key column order).
    pub fn get(&self, pk: &[Value]) -> Result<Option<Arc<Row>>, ReadError> {
        Ok(self.get_versioned(pk)?.map(|(_, r)| r))
    }

    pub fn get_versioned(&self, pk: &[Value]) -> Result<Option<(u64, Arc<Row>)>, ReadError> {
        let key = self
            .table
            .schema
            .encode_pk(&self.name, pk)
            .map_err(ReadError::narrow)?;
        Ok(self
            .table
            .rows
            .get(key.as_slice())
            .and_then(|e| e.value.as_ref().map(|r| (e.version, r.clone()))))
    }

    /// Live rows in primary-key order.
    pub(crate) fn raw_rows(&self) -> impl DoubleEndedIterator<Item = &Arc<Row>> + '_ {
        self.table.rows.values().filter_map(|e| e.value.as_ref())
    }

    pub fn query(&self, q: &Query) -> Result<QueryResult, ReadError> {
        run_query(&self.name, self.table, q).map_err(ReadError::narrow)
    }
}
