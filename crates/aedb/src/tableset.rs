//! The table files a state reads beneath its memtable, and the reads that merge
//! the two.
//!
//! Every `DbState` holds an `Arc<TableSet>`: the tables the manifest listed when
//! the state was published, newest first, and `flushed_seq`, the commit up to
//! which they hold everything. The state's maps (the memtable) hold at least
//! every write after `flushed_seq`, and may still hold older ones (a flush evicts
//! them only after its manifest switch). A read looks in the memtable first: an
//! entry there, a tombstone included, is the newest; only a key the memtable lacks
//! is looked up in the tables. A snapshot keeps its `Arc` and so the tables it
//! reads: a table a rewrite replaced is removed from disk when its last reader
//! drops (`OpenTable::retire`).

use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imbl::OrdMap;

use crate::error::AedbError;
use crate::lsm::{LiveTable, table_error};
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::state::Versioned;
use crate::model::value::Row;
use crate::storage::Storage;
use crate::table::{Entry, EntryKind, Lookup, MergeIter, Source, TableReader, Tombstones};

/// One open table file.
pub(crate) struct OpenTable {
    pub meta: LiveTable,
    pub reader: TableReader,
    /// Set once a manifest no longer lists the table: the file goes when the
    /// last state reading it drops.
    retired: AtomicBool,
    fs: Arc<dyn Storage>,
    path: PathBuf,
}

impl OpenTable {
    pub(crate) fn new(
        meta: LiveTable,
        reader: TableReader,
        fs: Arc<dyn Storage>,
        path: PathBuf,
    ) -> Self {
        Self {
            meta,
            reader,
            retired: AtomicBool::new(false),
            fs,
            path,
        }
    }

    /// The manifest no longer lists this table (its replacement is durable).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

impl Drop for OpenTable {
    fn drop(&mut self) {
        if self.retired.load(Ordering::Acquire)
            && let Err(e) = self.fs.remove_file(&self.path)
        {
            tracing::warn!(file = %self.path.display(), error = %e, "could not remove a replaced table");
        }
    }
}

impl std::fmt::Debug for OpenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTable")
            .field("id", &self.meta.id)
            .field("level", &self.meta.level)
            .finish_non_exhaustive()
    }
}

/// The tables beneath one state's memtable.
#[derive(Clone, Debug, Default)]
pub(crate) struct TableSet {
    /// Newest first: the first table holding a version of a key has its newest.
    pub tables: Vec<Arc<OpenTable>>,
    /// Every commit at or before this one is in the tables.
    pub flushed_seq: u64,
}

impl TableSet {
    /// How far tombstones may be purged from the memtable: a tombstone after
    /// `flushed_seq` hides a value the tables may still hold.
    pub(crate) fn purge_cap(&self, horizon: u64) -> u64 {
        if self.tables.is_empty() {
            horizon
        } else {
            horizon.min(self.flushed_seq)
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// A value as the memtable holds it, decoded from a table entry.
pub(crate) trait Stored: Clone {
    fn decode(bytes: Vec<u8>) -> Result<Self, String>;
}

impl Stored for SharedBytes {
    fn decode(bytes: Vec<u8>) -> Result<Self, String> {
        Ok(SharedBytes::from(bytes))
    }
}

impl Stored for Arc<Row> {
    fn decode(bytes: Vec<u8>) -> Result<Self, String> {
        postcard::from_bytes::<Row>(&bytes)
            .map(Arc::new)
            .map_err(|e| format!("undecodable row: {e}"))
    }
}

/// One keyspace (a scope's KV entries or a table's rows) of one state.
#[derive(Clone)]
pub(crate) struct Space<'a, V> {
    pub mem: &'a OrdMap<Bytes, Versioned<V>>,
    pub tables: &'a TableSet,
    /// The keyspace's internal-key prefix (`lsm::keyspace_prefix`).
    pub prefix: Vec<u8>,
    /// The state's seq: table entries after it are invisible.
    pub seq: u64,
    /// Table entries older than this belong to an earlier table of the same name.
    pub min_seq: u64,
}

impl<V> std::fmt::Debug for Space<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("memtable", &self.mem.len())
            .field("tables", &self.tables.tables.len())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

fn corrupt(t: &OpenTable, reason: String) -> AedbError {
    AedbError::corruption(&t.path, 0, reason)
}

/// The user key range `(start, end)` as the internal keys `[from, to)` of the
/// keyspace `prefix` (`to` None: to the end of the keyspace).
fn internal_range(
    prefix: &[u8],
    start: Bound<&[u8]>,
    end: Bound<&[u8]>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let from = match start {
        Bound::Included(s) | Bound::Excluded(s) => [prefix, s].concat(),
        Bound::Unbounded => prefix.to_vec(),
    };
    let to = match end {
        Bound::Excluded(e) => Some([prefix, e].concat()),
        // The smallest key after `e`.
        Bound::Included(e) => Some([prefix, e, &[0]].concat()),
        Bound::Unbounded => crate::txn::snapshot::prefix_successor(prefix),
    };
    (from, to)
}

impl<'a, V: Stored> Space<'a, V> {
    /// The newest entry of `key` (a tombstone: `value: None`), or None when the
    /// key was never written (or not since its table was created).
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Versioned<V>>, AedbError> {
        if let Some(e) = self.mem.get(key) {
            return Ok(Some(e.clone()));
        }
        if self.tables.is_empty() {
            return Ok(None);
        }
        let ik = [self.prefix.as_slice(), key].concat();
        for t in &self.tables.tables {
            if ik.as_slice() < t.meta.first_key.as_slice()
                || ik.as_slice() > t.meta.last_key.as_slice()
            {
                continue;
            }
            let found = match t.reader.get(&ik, self.seq).map_err(table_error)? {
                Lookup::Absent => continue,
                Lookup::Value { seq, value } => Versioned {
                    version: seq,
                    value: Some(V::decode(value).map_err(|r| corrupt(t, r))?),
                },
                Lookup::Deleted { seq } => Versioned {
                    version: seq,
                    value: None,
                },
            };
            return Ok((found.version >= self.min_seq).then_some(found));
        }
        Ok(None)
    }

    /// The newest live value of `key`.
    pub(crate) fn get_live(&self, key: &[u8]) -> Result<Option<(u64, V)>, AedbError> {
        Ok(self.get(key)?.and_then(|e| e.value.map(|v| (e.version, v))))
    }

    /// Whether `key` has a live value (what a write's live count adjusts by).
    pub(crate) fn is_live(&self, key: &[u8]) -> Result<bool, AedbError> {
        Ok(self.get(key)?.is_some_and(|e| e.value.is_some()))
    }

    /// Live entries with keys in the bounds, ascending (`rev`: descending).
    pub(crate) fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        rev: bool,
    ) -> SpaceIter<'a, V> {
        let empty = crate::txn::snapshot::bounds_empty(start, end);
        // imbl panics on an inverted range; an inverted range is simply empty.
        let mem: MemIter<'a, V> = if empty {
            Box::new(std::iter::empty())
        } else {
            let mem: &'a OrdMap<Bytes, Versioned<V>> = self.mem;
            let r = mem.range::<_, [u8]>((start, end));
            if rev { Box::new(r.rev()) } else { Box::new(r) }
        };
        let tables: Box<dyn Iterator<Item = Result<Entry, crate::table::TableError>> + 'a> =
            if empty || self.tables.is_empty() {
                Box::new(std::iter::empty())
            } else {
                let (from, to) = internal_range(&self.prefix, start, end);
                let set: &'a TableSet = self.tables;
                if rev {
                    Box::new(RevMerge::new(
                        set.tables
                            .iter()
                            .map(|t| t.reader.iter_range_rev(&from, to.as_deref(), self.seq))
                            .collect(),
                    ))
                } else {
                    let sources: Vec<Source<'a>> = set
                        .tables
                        .iter()
                        .map(|t| {
                            Box::new(t.reader.iter_range(&from, to.as_deref(), self.seq))
                                as Source<'a>
                        })
                        .collect();
                    Box::new(MergeIter::new(sources, self.seq, Tombstones::Hide))
                }
            };
        SpaceIter {
            mem: mem.peekable(),
            tables,
            table_head: None,
            tables_done: false,
            prefix_len: self.prefix.len(),
            min_seq: self.min_seq,
            rev,
            skip: match start {
                Bound::Excluded(s) => Some(s.to_vec()),
                _ => None,
            },
            failed: false,
        }
    }
}

/// The k-way merge of tables' reverse scans: each yields the newest version of
/// each key in descending key order, so per key the highest seq wins.
struct RevMerge<'a> {
    iters: Vec<crate::table::TableRevIter<'a>>,
    heads: Vec<Option<Entry>>,
    started: bool,
}

impl<'a> RevMerge<'a> {
    fn new(iters: Vec<crate::table::TableRevIter<'a>>) -> Self {
        let n = iters.len();
        Self {
            iters,
            heads: vec![None; n],
            started: false,
        }
    }

    fn step(&mut self) -> Result<Option<Entry>, crate::table::TableError> {
        if !self.started {
            self.started = true;
            for (h, it) in self.heads.iter_mut().zip(self.iters.iter_mut()) {
                *h = it.next().transpose()?;
            }
        }
        loop {
            // The largest key; among equal keys, the newest version.
            let mut best: Option<usize> = None;
            for (i, h) in self.heads.iter().enumerate() {
                let Some(e) = h else { continue };
                let better = match best.and_then(|b| self.heads[b].as_ref()) {
                    None => true,
                    Some(b) => e.key > b.key || (e.key == b.key && e.seq > b.seq),
                };
                if better {
                    best = Some(i);
                }
            }
            let Some(best) = best else { return Ok(None) };
            let Some(entry) = self.heads[best].take() else {
                return Ok(None);
            };
            self.heads[best] = self.iters[best].next().transpose()?;
            for i in 0..self.heads.len() {
                if self.heads[i].as_ref().is_some_and(|h| h.key == entry.key) {
                    self.heads[i] = self.iters[i].next().transpose()?;
                }
            }
            if entry.kind == EntryKind::Delete {
                continue;
            }
            return Ok(Some(entry));
        }
    }
}

impl Iterator for RevMerge<'_> {
    type Item = Result<Entry, crate::table::TableError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.step().transpose()
    }
}

/// A memtable range, in either direction.
type MemIter<'a, V> = Box<dyn Iterator<Item = (&'a Bytes, &'a Versioned<V>)> + 'a>;

/// A scan of one keyspace: the memtable merged over the tables (see
/// `Space::scan`). After an error it yields nothing more.
pub(crate) struct SpaceIter<'a, V> {
    mem: std::iter::Peekable<MemIter<'a, V>>,
    /// The tables' live entries (deletes already applied), in scan order.
    tables: Box<dyn Iterator<Item = Result<Entry, crate::table::TableError>> + 'a>,
    table_head: Option<Entry>,
    tables_done: bool,
    prefix_len: usize,
    min_seq: u64,
    rev: bool,
    /// An excluded start key (the tables' range includes it).
    skip: Option<Vec<u8>>,
    failed: bool,
}

impl<V: Stored> SpaceIter<'_, V> {
    fn fill_table_head(&mut self) -> Result<(), AedbError> {
        while self.table_head.is_none() && !self.tables_done {
            match self.tables.next() {
                None => self.tables_done = true,
                Some(Err(e)) => return Err(table_error(e)),
                Some(Ok(e)) => {
                    let user = e.key.get(self.prefix_len..).unwrap_or_default();
                    if e.seq < self.min_seq || self.skip.as_deref() == Some(user) {
                        continue;
                    }
                    self.table_head = Some(e);
                }
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(Bytes, Versioned<V>)>, AedbError> {
        loop {
            self.fill_table_head()?;
            let table_key = self
                .table_head
                .as_ref()
                .map(|e| e.key.get(self.prefix_len..).unwrap_or_default());
            let mem_key = self.mem.peek().map(|(k, _)| k.as_slice());
            let take_mem = match (mem_key, table_key) {
                (None, None) => return Ok(None),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(m), Some(t)) => {
                    if m == t {
                        // The memtable's version is the newer one.
                        self.table_head = None;
                        true
                    } else {
                        (m < t) != self.rev
                    }
                }
            };
            if take_mem {
                let Some((k, e)) = self.mem.next() else {
                    return Ok(None);
                };
                if e.value.is_some() {
                    return Ok(Some((k.clone(), e.clone())));
                }
                continue;
            }
            let Some(e) = self.table_head.take() else {
                return Ok(None);
            };
            let user = Bytes::from(e.key.get(self.prefix_len..).unwrap_or_default());
            let value = V::decode(e.value).map_err(|r| {
                AedbError::corruption("table data", 0, format!("{r} (seq {})", e.seq))
            })?;
            return Ok(Some((
                user,
                Versioned {
                    version: e.seq,
                    value: Some(value),
                },
            )));
        }
    }
}

impl<V: Stored> Iterator for SpaceIter<'_, V> {
    type Item = Result<(Bytes, Versioned<V>), AedbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let r = self.step().transpose();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

/// The KV keyspace of `project/scope` in `state`.
pub(crate) fn kv_space<'a>(
    state: &'a crate::model::state::DbState,
    project: &str,
    scope: &str,
) -> Result<Space<'a, SharedBytes>, AedbError> {
    let s = state.scope(project, scope)?;
    Ok(Space {
        mem: &s.kv,
        tables: &state.tables,
        prefix: crate::lsm::keyspace_prefix(project, scope, None),
        seq: state.seq,
        min_seq: 0,
    })
}

/// The rows of `project/scope/table` in `state`.
pub(crate) fn row_space<'a>(
    state: &'a crate::model::state::DbState,
    project: &str,
    scope: &str,
    table: &str,
) -> Result<Space<'a, Arc<Row>>, AedbError> {
    let t = state.table(project, scope, table)?;
    Ok(Space {
        mem: &t.rows,
        tables: &state.tables,
        prefix: crate::lsm::keyspace_prefix(project, scope, Some(table)),
        seq: state.seq,
        min_seq: t.created_seq,
    })
}
