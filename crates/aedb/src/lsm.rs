//! User data at rest: every KV entry and table row lives in table files (`table/`),
//! listed with their digests in the signed manifest. Schemas, grants, owners and
//! idempotency records (small) stay in the checkpoint file, which no longer holds
//! data.
//!
//! A checkpoint is a flush: it writes the difference between the state the tables
//! hold (`base`, the live checkpoint's state) and the state now, as level-0 tables,
//! so it costs what changed. Every `COMPACT_AT_TABLES` tables (and whenever a table
//! is sealed under another key than the configured one, or none exists yet) the
//! flush rewrites the whole state into level-1 tables instead: the bottom, so no
//! tombstone survives it.
//!
//! Stage note (issue #18): open still loads every table into the in-memory state;
//! reads do not go to the tables yet. The next step, as planned:
//! - the state's maps become the memtable: after a flush's manifest switch, under
//!   the commit lock, every entry with a version at or below the flushed LSN is
//!   evicted from the published state (tombstones too: the flush writes each one
//!   as a delete, so conflict checks find its version in the tables);
//! - a flush then writes the memtable's entries above the last flushed LSN (no
//!   diff), and `purge_tombstones` never purges past the last flushed LSN (an
//!   unflushed tombstone hides an older value in the tables);
//! - `DbState` carries an `Arc` of the open table set (newest first): a snapshot
//!   pins the tables it reads; a replaced table's file is removed when its last
//!   reader drops;
//! - reads (`KvView`, `TableView`, conflict checks, assertions, queries, audit
//!   heads, digests) go memtable first, then the tables through the shared
//!   `BlockCache` (`AedbConfig::cache_bytes`); reverse scans need a reverse table
//!   iterator; live counts are kept per keyspace in the catalog and adjusted by a
//!   bloom-filtered table lookup when a write finds no memtable entry;
//! - a table read can fail (I/O, corruption), but `KvView::get`, `scan_*` and
//!   `TableView::len` are infallible and used by aedb-bench: they need fallible
//!   forms (the `ReadTx` API already returns `ReadError`);
//! - the rewrite merges the tables (`MergeIter`, tombstones dropped at the
//!   bottom) instead of walking the in-memory state.
//!
//! Internal keys: `name(project) name(scope) 0x00 key` for a KV entry and
//! `name(project) name(scope) 0x01 name(table) key` for a row, where `name` escapes
//! 0x00 as 0x00 0xFF and ends with 0x00 0x01. The escaping preserves order, so the
//! state's nested maps iterate in internal-key order and a flush streams without
//! sorting.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;

use crate::config::SecretKey;
use crate::crypto::KEY_ID_LEN;
use crate::error::AedbError;
use crate::model::bytes::{Bytes, SharedBytes};
use crate::model::state::{DbState, Versioned};
use crate::model::value::Row;
use crate::storage::Storage;
use crate::table::{
    BlockCache, Entry, EntryKind, MergeIter, Source, TableError, TableMeta, TableReader,
    TableWriter, TableWriterOptions, Tombstones, file_name,
};

/// Level-0 tables that trigger a rewrite into level 1 at the next flush.
pub(crate) const COMPACT_AT_TABLES: usize = 8;
/// Entries per table file; a flush with more rolls over to the next file (bounds
/// the writer's bloom builder and index).
const MAX_ENTRIES_PER_TABLE: u64 = 4 << 20;
const SPACE_KV: u8 = 0;
const SPACE_ROWS: u8 = 1;
/// Largest sequence number a merge reads at (everything).
const READ_ALL: u64 = i64::MAX as u64;

/// A table file the manifest lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LiveTable {
    pub id: u64,
    /// 0: written by a flush (may hold tombstones); 1: a full rewrite (the bottom).
    pub level: u8,
    pub bytes: u64,
    /// SHA-256 of the whole file.
    pub digest: [u8; 32],
    pub entries: u64,
    pub first_key: Vec<u8>,
    pub last_key: Vec<u8>,
    pub min_seq: u64,
    pub max_seq: u64,
    /// Key the blocks are sealed under (zero: plaintext).
    pub key_id: [u8; KEY_ID_LEN],
}

impl LiveTable {
    fn from_meta(m: TableMeta, level: u8) -> Self {
        Self {
            id: m.id,
            level,
            bytes: m.size,
            digest: m.digest,
            entries: m.entries,
            first_key: m.first_key,
            last_key: m.last_key,
            min_seq: m.min_seq,
            max_seq: m.max_seq,
            key_id: m.key_id,
        }
    }

    pub(crate) fn file(&self) -> String {
        file_name(self.id)
    }
}

/// A table error as the engine reports it: I/O as I/O, a wrong key as a key
/// mismatch, anything else as corruption of the file it names.
pub(crate) fn table_error(e: TableError) -> AedbError {
    let reason = e.to_string();
    match e {
        TableError::Io { path, source, .. } => AedbError::io(path, source),
        TableError::KeyMismatch { path, .. } => AedbError::KeyMismatch { file: path, reason },
        TableError::Corrupt { path, .. }
        | TableError::DigestMismatch { path, .. }
        | TableError::OutOfOrder { path, .. }
        | TableError::Invalid { path, .. } => AedbError::corruption(path, 0, reason),
        TableError::MergeOrder { .. } => AedbError::corruption("table merge", 0, reason),
    }
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    for &b in name.as_bytes() {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Reads one `push_name` encoding off the front of `b`.
fn take_name(b: &[u8]) -> Option<(String, &[u8])> {
    let mut name = Vec::new();
    let mut i = 0;
    loop {
        let c = *b.get(i)?;
        if c != 0 {
            name.push(c);
            i += 1;
            continue;
        }
        match *b.get(i + 1)? {
            0xFF => name.push(0),
            1 => return Some((String::from_utf8(name).ok()?, &b[i + 2..])),
            _ => return None,
        }
        i += 2;
    }
}

/// The internal-key prefix of a scope's KV keyspace (`table: None`) or of a table.
pub(crate) fn keyspace_prefix(project: &str, scope: &str, table: Option<&str>) -> Vec<u8> {
    let mut p = Vec::with_capacity(project.len() + scope.len() + 8);
    push_name(&mut p, project);
    push_name(&mut p, scope);
    match table {
        None => p.push(SPACE_KV),
        Some(t) => {
            p.push(SPACE_ROWS);
            push_name(&mut p, t);
        }
    }
    p
}

/// Where an internal key belongs: (project, scope, table or None for KV, key).
type DecodedKey<'a> = (String, String, Option<String>, &'a [u8]);

fn decode_key(k: &[u8]) -> Option<DecodedKey<'_>> {
    let (project, rest) = take_name(k)?;
    let (scope, rest) = take_name(rest)?;
    let (&space, rest) = rest.split_first()?;
    match space {
        SPACE_KV => Some((project, scope, None, rest)),
        SPACE_ROWS => {
            let (table, rest) = take_name(rest)?;
            Some((project, scope, Some(table), rest))
        }
        _ => None,
    }
}

/// Streams sorted entries into table files, rolling over to a new file every
/// `MAX_ENTRIES_PER_TABLE` entries.
pub(crate) struct FlushSink<'a> {
    fs: &'a dyn Storage,
    dir: &'a Path,
    key: Option<&'a SecretKey>,
    level: u8,
    next_id: &'a mut dyn FnMut() -> u64,
    writer: Option<TableWriter<'a>>,
    in_current: u64,
    written: Vec<LiveTable>,
    internal_key: Vec<u8>,
}

impl<'a> FlushSink<'a> {
    pub(crate) fn new(
        fs: &'a dyn Storage,
        dir: &'a Path,
        key: Option<&'a SecretKey>,
        level: u8,
        next_id: &'a mut dyn FnMut() -> u64,
    ) -> Self {
        Self {
            fs,
            dir,
            key,
            level,
            next_id,
            writer: None,
            in_current: 0,
            written: Vec::new(),
            internal_key: Vec::new(),
        }
    }

    fn add(
        &mut self,
        prefix: &[u8],
        key: &[u8],
        seq: u64,
        kind: EntryKind,
        value: &[u8],
    ) -> Result<(), AedbError> {
        if self.in_current >= MAX_ENTRIES_PER_TABLE {
            self.finish_current()?;
        }
        let writer = match &mut self.writer {
            Some(w) => w,
            None => {
                let id = (self.next_id)();
                let options = TableWriterOptions {
                    max_entries: MAX_ENTRIES_PER_TABLE,
                    ..TableWriterOptions::default()
                };
                self.writer.insert(
                    TableWriter::create(self.fs, self.dir, id, self.key, options)
                        .map_err(table_error)?,
                )
            }
        };
        self.internal_key.clear();
        self.internal_key.extend_from_slice(prefix);
        self.internal_key.extend_from_slice(key);
        writer
            .add(&self.internal_key, seq, kind, value)
            .map_err(table_error)?;
        self.in_current += 1;
        Ok(())
    }

    fn finish_current(&mut self) -> Result<(), AedbError> {
        if let Some(w) = self.writer.take() {
            let meta = w.finish().map_err(table_error)?;
            self.written.push(LiveTable::from_meta(meta, self.level));
        }
        self.in_current = 0;
        Ok(())
    }

    /// The finished tables (none when nothing was added).
    pub(crate) fn finish(mut self) -> Result<Vec<LiveTable>, AedbError> {
        self.finish_current()?;
        Ok(std::mem::take(&mut self.written))
    }
}

fn encode_row(row: &Arc<Row>) -> Result<Cow<'_, [u8]>, AedbError> {
    postcard::to_allocvec(&**row)
        .map(Cow::Owned)
        .map_err(|e| AedbError::InvalidArgument(format!("row encoding: {e}")))
}

fn kv_bytes(v: &SharedBytes) -> Result<Cow<'_, [u8]>, AedbError> {
    Ok(Cow::Borrowed(v.as_slice()))
}

/// Every live entry of `state` (the rewrite into the bottom level).
pub(crate) fn write_all(sink: &mut FlushSink<'_>, state: &DbState) -> Result<(), AedbError> {
    for (pname, p) in &state.projects {
        for (sname, s) in &p.scopes {
            let prefix = keyspace_prefix(pname, sname, None);
            for (k, e) in &s.kv {
                if let Some(v) = &e.value {
                    sink.add(&prefix, k, e.version, EntryKind::Put, v.as_slice())?;
                }
            }
            for (tname, t) in &s.tables {
                let prefix = keyspace_prefix(pname, sname, Some(tname));
                for (k, e) in &t.rows {
                    if let Some(r) = &e.value {
                        sink.add(&prefix, k, e.version, EntryKind::Put, &encode_row(r)?)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// What changed from `base` (the state the tables hold) to `now`: a put for every
/// new or rewritten entry, a tombstone for every entry deleted since. A table
/// dropped (or dropped and created again) needs no tombstones: open ignores rows
/// older than their table's creation and rows of tables the catalog lacks.
pub(crate) fn write_changes(
    sink: &mut FlushSink<'_>,
    base: &DbState,
    now: &DbState,
) -> Result<(), AedbError> {
    let no_kv = OrdMap::new();
    let no_rows = OrdMap::new();
    for (pname, p) in &now.projects {
        let bp = base.projects.get(pname);
        for (sname, s) in &p.scopes {
            let bs = bp.and_then(|bp| bp.scopes.get(sname));
            let prefix = keyspace_prefix(pname, sname, None);
            let old = bs.map_or(&no_kv, |b| &b.kv);
            diff_into(sink, &prefix, old, &s.kv, now.seq, kv_bytes)?;
            for (tname, t) in &s.tables {
                let old = bs
                    .and_then(|b| b.tables.get(tname))
                    .filter(|bt| bt.created_seq == t.created_seq)
                    .map_or(&no_rows, |bt| &bt.rows);
                let prefix = keyspace_prefix(pname, sname, Some(tname));
                diff_into(sink, &prefix, old, &t.rows, now.seq, encode_row)?;
            }
        }
    }
    Ok(())
}

fn diff_into<V: Clone>(
    sink: &mut FlushSink<'_>,
    prefix: &[u8],
    old: &OrdMap<Bytes, Versioned<V>>,
    new: &OrdMap<Bytes, Versioned<V>>,
    now_seq: u64,
    encode: impl Fn(&V) -> Result<Cow<'_, [u8]>, AedbError>,
) -> Result<(), AedbError> {
    for d in old.diff(new) {
        match d {
            DiffItem::Add(k, e) | DiffItem::Update { new: (k, e), .. } if e.value.is_some() => {
                if let Some(v) = &e.value {
                    sink.add(prefix, k, e.version, EntryKind::Put, &encode(v)?)?;
                }
            }
            DiffItem::Update {
                old: (_, o),
                new: (k, e),
            } => {
                // A tombstone over a value the tables hold.
                if o.value.is_some() {
                    sink.add(prefix, k, e.version, EntryKind::Delete, &[])?;
                }
            }
            DiffItem::Add(..) => {}
            DiffItem::Remove(k, o) => {
                // Deleted, and its tombstone purged since: the delete happened at
                // or before `now_seq`, after the version the tables hold.
                if o.value.is_some() {
                    sink.add(prefix, k, now_seq, EntryKind::Delete, &[])?;
                }
            }
        }
    }
    Ok(())
}

/// Opens the listed tables under the matching key of `keys` and checks each
/// against the manifest: the whole file's SHA-256 always (open reads every
/// table in full anyway at this stage), and with `full` every block too.
pub(crate) fn open_tables(
    fs: &dyn Storage,
    dir: &Path,
    tables: &[LiveTable],
    keys: &[&SecretKey],
    cache: &Arc<BlockCache>,
    full: bool,
) -> Result<Vec<TableReader>, AedbError> {
    let mut readers = Vec::with_capacity(tables.len());
    for t in tables {
        let path = dir.join(t.file());
        let key = if t.key_id == [0u8; KEY_ID_LEN] {
            None
        } else {
            Some(
                keys.iter()
                    .copied()
                    .find(|k| crate::crypto::key_id(k) == t.key_id)
                    .ok_or_else(|| AedbError::KeyMismatch {
                        file: path.clone(),
                        reason: format!(
                            "table {} is sealed under key id {}, which no configured checkpoint key has",
                            t.id,
                            hex::encode(t.key_id)
                        ),
                    })?,
            )
        };
        let reader =
            TableReader::open(fs, &path, t.id, key, Arc::clone(cache)).map_err(table_error)?;
        if full {
            reader.verify_full(&t.digest).map_err(table_error)?;
        } else {
            let actual = reader.file_digest().map_err(table_error)?;
            if !crate::crypto::ct_eq(&actual, &t.digest) {
                return Err(AedbError::corruption(
                    &path,
                    0,
                    "table does not match the digest the manifest records (replaced or altered)",
                ));
            }
        }
        if reader.entries() != t.entries || reader.seq_range() != (t.min_seq, t.max_seq) {
            return Err(AedbError::corruption(
                &path,
                0,
                "table entry count or sequence range differs from the manifest's",
            ));
        }
        readers.push(reader);
    }
    Ok(readers)
}

/// Opens the table file at `path` under whichever of `keys` (or none) its footer
/// names, verifies every block and, when given, the file's SHA-256 against
/// `expected`, and describes it as a manifest lists it (level 0: a restored
/// table's level is not recorded; only the rewrite policy reads it).
pub(crate) fn verify_table_file(
    fs: &dyn Storage,
    path: &Path,
    id: u64,
    keys: &[&SecretKey],
    cache: &Arc<BlockCache>,
    expected: Option<&[u8; 32]>,
) -> Result<LiveTable, AedbError> {
    let mut last = None;
    for key in keys.iter().copied().map(Some).chain(std::iter::once(None)) {
        match TableReader::open(fs, path, id, key, Arc::clone(cache)) {
            Ok(reader) => {
                let digest = match expected {
                    Some(d) => {
                        reader.verify_full(d).map_err(table_error)?;
                        *d
                    }
                    None => {
                        let d = reader.file_digest().map_err(table_error)?;
                        reader.verify_blocks().map_err(table_error)?;
                        d
                    }
                };
                let first = reader.iter_all().next().transpose().map_err(table_error)?;
                let (min_seq, max_seq) = reader.seq_range();
                return Ok(LiveTable {
                    id,
                    level: 0,
                    bytes: reader.file_len(),
                    digest,
                    entries: reader.entries(),
                    first_key: first.map(|e| e.key).unwrap_or_default(),
                    last_key: reader.last_key().to_vec(),
                    min_seq,
                    max_seq,
                    key_id: key.map(crate::crypto::key_id).unwrap_or_default(),
                });
            }
            Err(e @ TableError::KeyMismatch { .. }) => last = Some(e),
            Err(e) => return Err(table_error(e)),
        }
    }
    Err(last.map_or_else(
        || AedbError::corruption(path, 0, "no key to open the table with"),
        table_error,
    ))
}

/// One keyspace being rebuilt from the merge, in key order.
enum Run {
    Kv {
        project: String,
        scope: String,
        entries: Vec<(Bytes, Versioned<SharedBytes>)>,
    },
    Rows {
        project: String,
        scope: String,
        table: String,
        entries: Vec<(Bytes, Versioned<Arc<Row>>)>,
    },
}

/// Merges the tables (newest version of every key, deletes applied) into `state`,
/// whose catalog (projects, scopes, tables) the checkpoint restored. Returns the
/// live entries loaded.
pub(crate) fn load_into(
    state: &mut DbState,
    readers: &[TableReader],
    dir: &Path,
) -> Result<u64, AedbError> {
    let sources: Vec<Source<'_>> = readers
        .iter()
        .map(|r| Box::new(r.iter_all()) as Source<'_>)
        .collect();
    let merged = MergeIter::new(sources, READ_ALL, Tombstones::Hide);
    let bad = |reason: String| AedbError::corruption(dir, 0, format!("table data: {reason}"));
    let mut run: Option<Run> = None;
    let mut loaded = 0u64;
    for entry in merged {
        let Entry {
            key, seq, value, ..
        } = entry.map_err(table_error)?;
        let Some((project, scope, table, user_key)) = decode_key(&key) else {
            return Err(bad(format!(
                "undecodable internal key {}",
                hex::encode(&key)
            )));
        };
        let same = match (&run, &table) {
            (
                Some(Run::Kv {
                    project: p,
                    scope: s,
                    ..
                }),
                None,
            ) => *p == project && *s == scope,
            (
                Some(Run::Rows {
                    project: p,
                    scope: s,
                    table: t,
                    ..
                }),
                Some(tn),
            ) => *p == project && *s == scope && t == tn,
            _ => false,
        };
        if !same {
            if let Some(r) = run.take() {
                close_run(state, r, &bad)?;
            }
            run = Some(match table {
                None => Run::Kv {
                    project,
                    scope,
                    entries: Vec::new(),
                },
                Some(table) => Run::Rows {
                    project,
                    scope,
                    table,
                    entries: Vec::new(),
                },
            });
        }
        match &mut run {
            Some(Run::Kv { entries, .. }) => entries.push((
                Bytes::from(user_key),
                Versioned {
                    version: seq,
                    value: Some(SharedBytes::from(value)),
                },
            )),
            Some(Run::Rows { entries, .. }) => {
                let row: Row = postcard::from_bytes(&value)
                    .map_err(|e| bad(format!("undecodable row at seq {seq}: {e}")))?;
                entries.push((
                    Bytes::from(user_key),
                    Versioned {
                        version: seq,
                        value: Some(Arc::new(row)),
                    },
                ));
            }
            None => {}
        }
        loaded += 1;
    }
    if let Some(r) = run.take() {
        close_run(state, r, &bad)?;
    }
    Ok(loaded)
}

fn close_run(
    state: &mut DbState,
    run: Run,
    bad: &dyn Fn(String) -> AedbError,
) -> Result<(), AedbError> {
    match run {
        Run::Kv {
            project,
            scope,
            entries,
        } => {
            let s = state
                .projects
                .get_mut(&project)
                .and_then(|p| p.scopes.get_mut(&scope))
                .ok_or_else(|| bad(format!("keys of {project}/{scope}, which does not exist")))?;
            for (k, e) in entries {
                let prev = s.kv.insert(k, e);
                if !matches!(prev, Some(Versioned { value: Some(_), .. })) {
                    s.live_keys += 1;
                }
            }
        }
        Run::Rows {
            project,
            scope,
            table,
            entries,
        } => {
            let s = state
                .projects
                .get_mut(&project)
                .and_then(|p| p.scopes.get_mut(&scope))
                .ok_or_else(|| bad(format!("rows of {project}/{scope}, which does not exist")))?;
            // Rows of a dropped table, or of an earlier table of the same name, are
            // left for the next rewrite to drop.
            let Some(t) = s.tables.get_mut(&table) else {
                return Ok(());
            };
            for (k, e) in entries {
                if e.version < t.created_seq {
                    continue;
                }
                let Some(row) = &e.value else { continue };
                // Queries index rows by column: a row must fit its table.
                t.schema.check_row(&table, row)?;
                if t.schema.row_key(row).as_slice() != k.as_slice() {
                    return Err(bad(format!(
                        "a row of {project}/{scope}/{table} stored under a key that is not its primary key"
                    )));
                }
                let prev = t.rows.insert(k, e);
                if !matches!(prev, Some(Versioned { value: Some(_), .. })) {
                    t.live_rows += 1;
                }
            }
        }
    }
    Ok(())
}

/// The state with its data removed: what the checkpoint file holds now that the
/// data lives in tables (O(1) per keyspace: persistent maps are cloned, not copied).
pub(crate) fn catalog_only(state: &DbState) -> DbState {
    let mut c = state.clone();
    c.projects = state
        .projects
        .iter()
        .map(|(pname, p)| {
            let mut p = p.clone();
            p.scopes = p
                .scopes
                .iter()
                .map(|(sname, s)| {
                    let mut s = s.clone();
                    s.kv = OrdMap::new();
                    s.live_keys = 0;
                    s.tables = s
                        .tables
                        .iter()
                        .map(|(tname, t)| {
                            let mut t = t.clone();
                            t.rows = OrdMap::new();
                            t.live_rows = 0;
                            (tname.clone(), t)
                        })
                        .collect();
                    (sname.clone(), s)
                })
                .collect();
            p.deletes = imbl::Vector::new();
            (pname.clone(), p)
        })
        .collect();
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_and_keep_order() {
        let names = ["", "a", "a\0", "a\0b", "ab", "b", "\u{ff}"];
        for w in names.windows(2) {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            push_name(&mut x, w[0]);
            push_name(&mut y, w[1]);
            assert!(x < y, "{:?} sorts before {:?}", w[0], w[1]);
        }
        for n in names {
            let k = [keyspace_prefix(n, "s", Some(n)), b"key".to_vec()].concat();
            let (p, s, t, key) = decode_key(&k).expect("decodes");
            assert_eq!(
                (p.as_str(), s.as_str(), t.as_deref(), key),
                (n, "s", Some(n), &b"key"[..])
            );
        }
        let kv = [keyspace_prefix("p", "s", None), vec![0, 1, 2]].concat();
        assert_eq!(
            decode_key(&kv).expect("decodes"),
            ("p".to_string(), "s".to_string(), None, &[0u8, 1, 2][..])
        );
        // KV entries of a scope sort before its tables' rows, as the state iterates.
        assert!(keyspace_prefix("p", "s", None) < keyspace_prefix("p", "s", Some("")));
        assert!(decode_key(&[0, 2]).is_none());
    }
}
