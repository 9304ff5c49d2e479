//! Read-only views over one committed state.

use std::ops::Bound;
use std::sync::Arc;

use crate::error::{AedbError, NotFoundKind, ReadError};
use crate::model::bytes::SharedBytes;
use crate::model::state::{DbState, ScopeState, TableState};
use crate::model::value::{Row, TableSchema, Value};
use crate::tableset::{Space, kv_space, row_space};
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
        kv_view(&self.state, project, scope).map_err(ReadError::narrow)
    }

    pub fn table<'a>(
        &'a self,
        project: &str,
        scope: &str,
        table: &str,
    ) -> Result<TableView<'a>, ReadError> {
        table_view(&self.state, project, scope, table).map_err(ReadError::narrow)
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

/// The KV keyspace of `project/scope` in `state`.
pub(crate) fn kv_view<'a>(
    state: &'a DbState,
    project: &str,
    scope: &str,
) -> Result<KvView<'a>, AedbError> {
    Ok(KvView {
        scope: state.scope(project, scope)?,
        space: kv_space(state, project, scope)?,
    })
}

/// The table `project/scope/table` in `state`.
pub(crate) fn table_view<'a>(
    state: &'a DbState,
    project: &str,
    scope: &str,
    table: &str,
) -> Result<TableView<'a>, AedbError> {
    Ok(TableView {
        name: table.to_string(),
        table: state.table(project, scope, table)?,
        space: row_space(state, project, scope, table)?,
    })
}

/// The KV keyspace of one scope in a snapshot: its memtable, then its tables.
#[derive(Debug, Clone)]
pub struct KvView<'a> {
    scope: &'a ScopeState,
    space: Space<'a, SharedBytes>,
}

impl KvView<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Arc<[u8]>>, ReadError> {
        Ok(self.get_versioned(key)?.map(|(_, v)| v))
    }

    /// The value and the sequence number of the commit that wrote it.
    pub fn get_versioned(&self, key: &[u8]) -> Result<Option<Versioned>, ReadError> {
        Ok(self
            .space
            .get_live(key)
            .map_err(ReadError::narrow)?
            .map(|(version, v)| (version, v.to_arc())))
    }

    /// Version of `key` (0 when absent or deleted).
    pub fn version(&self, key: &[u8]) -> Result<u64, ReadError> {
        Ok(self.get_versioned(key)?.map_or(0, |(v, _)| v))
    }

    /// Live keys in this keyspace (a count kept per keyspace: no table read).
    pub fn len(&self) -> usize {
        self.scope.live_keys
    }

    pub fn is_empty(&self) -> bool {
        self.scope.live_keys == 0
    }

    /// Up to `limit` live entries with keys in the bounds, in key order (`rev`:
    /// descending), as (key, (version, value)).
    fn live(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        rev: bool,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.space
            .scan(start, end, rev)
            .take(limit)
            .map(|r| {
                r.map(|(k, e)| {
                    let v = e
                        .value
                        .map(|v| v.to_arc())
                        .unwrap_or_else(|| Arc::from(&[][..]));
                    (k, (e.version, v))
                })
                .map_err(ReadError::narrow)
            })
            .collect()
    }

    /// Up to `limit` pairs with keys in `[start, end)` (per the bounds), in key order.
    pub fn scan_range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        Ok(unversioned(self.live(start, end, false, limit)?))
    }

    /// `scan_range` with the version of each value.
    pub fn scan_range_versioned(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.live(start, end, false, limit)
    }

    /// Up to `limit` pairs with keys in `[start, end)` (per the bounds), in
    /// descending key order: the newest entries of a time-ordered keyspace first.
    pub fn scan_range_rev(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KvPair>, ReadError> {
        Ok(unversioned(self.live(start, end, true, limit)?))
    }

    /// `scan_range_rev` with the version of each value.
    pub fn scan_range_rev_versioned(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        self.live(start, end, true, limit)
    }

    /// Up to `limit` pairs whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<KvPair>, ReadError> {
        let end = prefix_successor(prefix);
        self.scan_range(Bound::Included(prefix), prefix_end(end.as_deref()), limit)
    }

    /// `scan_prefix` with the version of each value.
    pub fn scan_prefix_versioned(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<VersionedKvPair>, ReadError> {
        let end = prefix_successor(prefix);
        self.scan_range_versioned(Bound::Included(prefix), prefix_end(end.as_deref()), limit)
    }
}

fn unversioned(pairs: Vec<VersionedKvPair>) -> Vec<KvPair> {
    pairs.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn prefix_end(successor: Option<&[u8]>) -> Bound<&[u8]> {
    successor.map_or(Bound::Unbounded, Bound::Excluded)
}

pub(crate) fn bounds_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
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

/// One table in a snapshot: its memtable, then its tables.
#[derive(Debug, Clone)]
pub struct TableView<'a> {
    name: String,
    table: &'a TableState,
    space: Space<'a, Arc<Row>>,
}

impl<'a> TableView<'a> {
    pub fn schema(&self) -> &TableSchema {
        &self.table.schema
    }

    /// Live rows (a count kept per table: no table read).
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
        self.space
            .get_live(key.as_slice())
            .map_err(ReadError::narrow)
    }

    /// Live rows in primary-key order, as (key, (version, row)).
    pub(crate) fn rows(&self) -> crate::tableset::SpaceIter<'a, Arc<Row>> {
        self.space.scan(Bound::Unbounded, Bound::Unbounded, false)
    }

    /// Live rows with keys after `after` (None: all), in primary-key order.
    pub(crate) fn rows_after(
        &self,
        after: Option<&[u8]>,
    ) -> crate::tableset::SpaceIter<'a, Arc<Row>> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.space.scan(start, Bound::Unbounded, false)
    }

    /// The live row with the largest key.
    pub(crate) fn last_row(&self) -> Result<Option<Arc<Row>>, AedbError> {
        match self
            .space
            .scan(Bound::Unbounded, Bound::Unbounded, true)
            .next()
        {
            Some(r) => Ok(r?.1.value),
            None => Ok(None),
        }
    }

    pub fn query(&self, q: &Query) -> Result<QueryResult, ReadError> {
        run_query(&self.name, self, q).map_err(ReadError::narrow)
    }

    pub(crate) fn state(&self) -> &'a TableState {
        self.table
    }
}
