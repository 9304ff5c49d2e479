//! User data at rest: every KV entry and table row lives in table files (`table/`),
//! listed with their digests in the signed manifest. Schemas, grants, owners,
//! idempotency records and per-keyspace live counts (small) stay in the checkpoint
//! file, which holds no data.
//!
//! The state's maps are the memtable: every write since the last flush (and
//! tombstones a write transaction may still need). `DbState::tables`
//! (`tableset.rs`) is the table set beneath them; reads go memtable first, then
//! the tables through the shared `BlockCache`. Open reads the manifest and the
//! tables' footers, indexes and bloom filters, not their data.
//!
//! A checkpoint is a flush: it writes the memtable's entries after the tables'
//! `flushed_seq` as level-0 tables, so it costs what changed. Every
//! `COMPACT_AT_TABLES` tables (and whenever a table is sealed under another key
//! than the configured one, or none exists yet) the flush rewrites the memtable
//! merged over every table into level-1 tables instead: the bottom, so no
//! tombstone survives it. After the manifest switch, under the commit lock, the
//! published state drops the entries at or before the flushed LSN (`evict`) and
//! reads the new table set; `purge_tombstones` never purges past it.
//!
//! Stage note (issue #18): what is left.
//! - Compaction runs inside the checkpoint (the rewrite), holding the checkpoint
//!   lock: it should move to a background thread merging level-0 tables, with the
//!   tables it reads pinned by their `Arc` as snapshots already are.
//! - Eviction walks the memtable under the commit lock (O(memtable)); building it
//!   from the flushed state outside the lock and applying the later commits' diff
//!   under it would bound the stall by the writes during the flush.
//! - A write of a key the memtable lacks looks it up in the tables to keep the live
//!   counts (`was_live` in `model/state.rs`): a bloom-filtered point read.
//! - Random gets that miss the cache read, check and decode a whole block (W6,
//!   1M keys: 0.53x redb plain, 0.26x encrypted); a larger default cache or
//!   smaller blocks for point reads would help. Longest commit under load is
//!   still ~0.5 s (the rewrite's I/O competes with the WAL's fsyncs).
//! - Incremental backups still replay the WAL rather than copy new tables.
//!
//! Internal keys: `name(project) name(scope) 0x00 key` for a KV entry and
//! `name(project) name(scope) 0x01 name(table) key` for a row, where `name` escapes
//! 0x00 as 0x00 0xFF and ends with 0x00 0x01. The escaping preserves order, so the
//! state's nested maps iterate in internal-key order and a flush streams without
//! sorting.

use std::path::Path;
use std::sync::Arc;

use imbl::OrdMap;

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
use crate::tableset::{TableSet, kv_space, row_space};

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

/// Every memtable entry of `state` written after `above`, in internal-key order,
/// tombstones as deletes: a level-0 flush, and the newest source of a rewrite.
pub(crate) fn memtable_entries(
    state: &DbState,
    above: u64,
) -> impl Iterator<Item = Result<Entry, TableError>> + Send + '_ {
    fn entry<V>(
        prefix: &[u8],
        k: &Bytes,
        e: &Versioned<V>,
        encode: impl Fn(&V) -> Result<Vec<u8>, TableError>,
    ) -> Result<Entry, TableError> {
        let (kind, value) = match &e.value {
            Some(v) => (EntryKind::Put, encode(v)?),
            None => (EntryKind::Delete, Vec::new()),
        };
        Ok(Entry {
            key: [prefix, k.as_slice()].concat(),
            seq: e.version,
            kind,
            value,
        })
    }
    state.projects.iter().flat_map(move |(pname, p)| {
        p.scopes.iter().flat_map(move |(sname, s)| {
            let prefix = keyspace_prefix(pname, sname, None);
            let kv =
                s.kv.iter()
                    .filter(move |(_, e)| e.version > above)
                    .map(move |(k, e)| entry(&prefix, k, e, |v: &SharedBytes| Ok(v.to_vec())));
            let rows = s.tables.iter().flat_map(move |(tname, t)| {
                let prefix = keyspace_prefix(pname, sname, Some(tname));
                t.rows
                    .iter()
                    .filter(move |(_, e)| e.version > above)
                    .map(move |(k, e)| {
                        entry(&prefix, k, e, |r: &Arc<Row>| {
                            postcard::to_allocvec(&**r).map_err(|e| TableError::Invalid {
                                table: 0,
                                path: std::path::PathBuf::from("memtable"),
                                reason: format!("row encoding: {e}"),
                            })
                        })
                    })
            });
            kv.chain(rows)
        })
    })
}

/// A level-0 flush: the memtable's entries after the tables' `flushed_seq`.
pub(crate) fn write_flush(sink: &mut FlushSink<'_>, state: &DbState) -> Result<(), AedbError> {
    for e in memtable_entries(state, state.tables.flushed_seq) {
        let e = e.map_err(table_error)?;
        sink.add(&[], &e.key, e.seq, e.kind, &e.value)?;
    }
    Ok(())
}

/// A rewrite into the bottom level: the memtable merged over every table, each
/// key's newest version, deletes applied (no tombstone survives), and rows of
/// tables the catalog no longer has (or older than the table of that name) left
/// out.
pub(crate) fn write_rewrite(sink: &mut FlushSink<'_>, state: &DbState) -> Result<(), AedbError> {
    let mut sources: Vec<Source<'_>> = vec![Box::new(memtable_entries(state, 0))];
    sources.extend(
        state
            .tables
            .tables
            .iter()
            .map(|t| Box::new(t.reader.iter_all()) as Source<'_>),
    );
    // The keyspace of the last entry and whether its entries are kept (from what
    // version on): entries come grouped by keyspace, so the catalog is consulted
    // once per keyspace.
    let mut current: Option<(Vec<u8>, Option<u64>)> = None;
    for e in MergeIter::new(sources, READ_ALL, Tombstones::Hide) {
        let e = e.map_err(table_error)?;
        let Some(prefix) = keyspace_len(&e.key).map(|n| &e.key[..n]) else {
            return Err(AedbError::corruption(
                "table merge",
                0,
                format!("undecodable internal key {}", hex::encode(&e.key)),
            ));
        };
        if current.as_ref().is_none_or(|(p, _)| p.as_slice() != prefix) {
            current = Some((prefix.to_vec(), keyspace_min_seq(state, &e.key)));
        }
        let keep_from = current.as_ref().and_then(|(_, m)| *m);
        if keep_from.is_some_and(|min| e.seq >= min) {
            sink.add(&[], &e.key, e.seq, e.kind, &e.value)?;
        }
    }
    Ok(())
}

/// Length of the `push_name` encoding at the front of `b`.
fn name_len(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        if *b.get(i)? != 0 {
            i += 1;
            continue;
        }
        match *b.get(i + 1)? {
            0xFF => i += 2,
            1 => return Some(i + 2),
            _ => return None,
        }
    }
}

/// Length of the keyspace prefix of an internal key (all before the user key).
fn keyspace_len(k: &[u8]) -> Option<usize> {
    let mut i = name_len(k)?;
    i += name_len(k.get(i..)?)?;
    let space = *k.get(i)?;
    i += 1;
    match space {
        SPACE_KV => Some(i),
        SPACE_ROWS => Some(i + name_len(k.get(i..)?)?),
        _ => None,
    }
}

/// Whether the catalog of `state` has the keyspace of internal key `k`: the
/// oldest version it keeps (a table's creation), or None when it is gone.
fn keyspace_min_seq(state: &DbState, k: &[u8]) -> Option<u64> {
    let (project, scope, table, _) = decode_key(k)?;
    let s = state.scope(&project, &scope).ok()?;
    match table {
        None => Some(0),
        Some(t) => s.tables.get(&t).map(|t| t.created_seq),
    }
}

/// Opens the listed tables under the matching key of `keys` and checks each
/// against the manifest: entry count and sequence range; with `full` the whole
/// file's SHA-256 and every block. Without `full`, `plain_digests` checks the
/// SHA-256 of plaintext tables (a signed manifest's digest is all that shows a
/// deliberate edit of one); no data of a sealed table is read.
pub(crate) fn open_tables(
    fs: &dyn Storage,
    dir: &Path,
    tables: &[LiveTable],
    keys: &[&SecretKey],
    cache: &Arc<BlockCache>,
    full: bool,
    plain_digests: bool,
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
        } else if plain_digests && t.key_id == [0u8; KEY_ID_LEN] {
            // A plaintext table's blocks carry a CRC, not authentication: only the
            // whole file's digest in the signed manifest tells it was not edited.
            // A sealed table's footer, index and bloom filter were just
            // authenticated under its key and id, and each block is when read, so
            // open reads none of its data.
            let actual = reader.file_digest().map_err(table_error)?;
            if !crate::crypto::ct_eq(&actual, &t.digest) {
                return Err(AedbError::corruption(
                    &path,
                    0,
                    "table does not match the digest the manifest records (replaced or altered)",
                ));
            }
        }
        if reader.entries() != t.entries
            || reader.seq_range() != (t.min_seq, t.max_seq)
            || reader.file_len() != t.bytes
        {
            return Err(AedbError::corruption(
                &path,
                0,
                "table size, entry count or sequence range differs from the manifest's",
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

/// `evict` for one project: drops its memtable entries (tombstones aside) written
/// at or before `flushed`. A commit applies to a copy of its project taken before
/// it published; when a flush's eviction published in between, the copy is
/// evicted the same way before it replaces the project.
pub(crate) fn evict_project(p: &mut crate::model::state::ProjectState, flushed: u64) {
    let keep = |version: u64, tombstone: bool| version > flushed || tombstone;
    let scopes: Vec<String> = p.scopes.keys().cloned().collect();
    for sname in scopes {
        let Some(s) = p.scopes.get_mut(&sname) else {
            continue;
        };
        if s.kv.values().any(|e| !keep(e.version, e.value.is_none())) {
            s.kv =
                s.kv.iter()
                    .filter(|(_, e)| keep(e.version, e.value.is_none()))
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect();
        }
        let tables: Vec<String> = s.tables.keys().cloned().collect();
        for tname in tables {
            let Some(t) = s.tables.get_mut(&tname) else {
                continue;
            };
            if t.rows.values().any(|e| !keep(e.version, e.value.is_none())) {
                t.rows = t
                    .rows
                    .iter()
                    .filter(|(_, e)| keep(e.version, e.value.is_none()))
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect();
            }
        }
    }
}

/// Recounts the live entries of every keyspace from the tables (a checkpoint
/// written before counts were recorded, or permissive recovery's tables).
pub(crate) fn count_live(state: &mut DbState) -> Result<(), AedbError> {
    let mut counts = Vec::new();
    for (pname, p) in &state.projects {
        for (sname, s) in &p.scopes {
            let n = count(kv_space(state, pname, sname)?.scan(
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                false,
            ))?;
            counts.push((pname.clone(), sname.clone(), None, n));
            for tname in s.tables.keys() {
                let n = count(row_space(state, pname, sname, tname)?.scan(
                    std::ops::Bound::Unbounded,
                    std::ops::Bound::Unbounded,
                    false,
                ))?;
                counts.push((pname.clone(), sname.clone(), Some(tname.clone()), n));
            }
        }
    }
    for (p, sc, t, n) in counts {
        let Some(s) = state
            .projects
            .get_mut(&p)
            .and_then(|p| p.scopes.get_mut(&sc))
        else {
            continue;
        };
        match t {
            None => s.live_keys = n,
            Some(t) => {
                if let Some(t) = s.tables.get_mut(&t) {
                    t.live_rows = n;
                }
            }
        }
    }
    Ok(())
}

fn count<T>(mut it: impl Iterator<Item = Result<T, AedbError>>) -> Result<usize, AedbError> {
    it.try_fold(0usize, |n, r| r.map(|_| n + 1))
}

/// `state` without the memtable entries the tables of `tables` now hold (written
/// at or before its `flushed_seq`), reading those tables. Tombstones stay until
/// `purge_tombstones` takes them: a rewrite drops deletes, and a write
/// transaction open since before one still needs its version to conflict.
pub(crate) fn evict(state: &DbState, tables: Arc<TableSet>) -> DbState {
    let flushed = tables.flushed_seq;
    let mut next = state.clone();
    next.tables = tables;
    let names: Vec<String> = next.projects.keys().cloned().collect();
    for pname in names {
        if let Some(p) = next.projects.get_mut(&pname) {
            evict_project(p, flushed);
        }
    }
    next
}

/// The state with its data removed: what the checkpoint file holds now that the
/// data lives in tables (O(1) per keyspace: persistent maps are cloned, not
/// copied). The live counts stay: the file records them.
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
                    s.tables = s
                        .tables
                        .iter()
                        .map(|(tname, t)| {
                            let mut t = t.clone();
                            t.rows = OrdMap::new();
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
