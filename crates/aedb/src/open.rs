//! Opening a data directory: the manifest, the checkpoint it names, and the rules
//! that decide which files are live. Shared by `AedbInstance::open` and the
//! read-only inspection of the `aedb` CLI.

use crate::tableset::{OpenTable, TableSet};
use std::path::{Path, PathBuf};

use crate::checkpoint::{self, CheckpointMeta, LoadedState};
use crate::config::{AedbConfig, DurabilityMode, RecoveryMode};
use crate::error::AedbError;
use crate::lsm::{self, LiveTable};
use crate::manifest::{
    self, CheckpointRef, DurableHeadRef, ManifestBody, SealedRef, SegmentRef, TableRef,
};
use crate::table::BlockCache;
use crate::wal::ChainHead;
use crate::wal::format::segment_file_name;
use crate::wal::recovery::{ReplayStart, list_segments, segment_is_empty};
use crate::wal::writer::{ForeignChain, SealedSegment};

/// What the manifest will say next time it is written.
pub(crate) struct ManifestState {
    pub generation: u64,
    pub checkpoint: Option<CheckpointMeta>,
    pub sealed: Vec<SealedSegment>,
    pub active_index: u64,
    pub active_first_lsn: u64,
    /// Segments holding frames after this LSN are kept for the next incremental
    /// backup (None: no backup chain to serve).
    pub backup_floor_lsn: Option<u64>,
    /// The durable end of the log, as far as it has been recorded (see
    /// `advance_durable_head`).
    pub durable_head: Option<ChainHead>,
    /// The table files holding user data, oldest first.
    pub tables: Vec<LiveTable>,
    /// Next table id to hand out (ids are never reused).
    pub next_table_id: u64,
}

impl ManifestState {
    /// A fresh table id, never used in this directory.
    pub fn allocate_table_id(&mut self) -> u64 {
        // Table ids start at 1 (FORMAT.md, "Table files").
        let id = self.next_table_id.max(1);
        self.next_table_id = id + 1;
        id
    }

    /// Records that the log is durable up to `head`; true when that is news (the
    /// manifest is then worth rewriting).
    pub fn advance_durable_head(&mut self, head: ChainHead) -> bool {
        if self.durable_head.is_some_and(|d| d.lsn >= head.lsn) {
            return false;
        }
        self.durable_head = Some(head);
        true
    }
}

pub(crate) fn write_manifest(
    dir: &Path,
    config: &AedbConfig,
    ms: &mut ManifestState,
) -> Result<(), AedbError> {
    ms.generation += 1;
    let mut segments: Vec<SegmentRef> = ms
        .sealed
        .iter()
        .map(|s| SegmentRef {
            file: segment_file_name(s.index),
            index: s.index,
            first_lsn: s.first_lsn,
            sealed: Some(SealedRef {
                last_lsn: s.last_lsn,
                end_hash: hex::encode(s.end_hash),
                chain_key_id: s.foreign.map(|f| hex::encode(f.key_id)),
                sha256: s.foreign.map(|f| hex::encode(f.sha256)),
            }),
        })
        .collect();
    segments.push(SegmentRef {
        file: segment_file_name(ms.active_index),
        index: ms.active_index,
        first_lsn: ms.active_first_lsn,
        sealed: None,
    });
    let body = ManifestBody {
        format_version: manifest::FORMAT_VERSION,
        generation: ms.generation,
        checkpoint: ms.checkpoint.as_ref().map(|c| CheckpointRef {
            file: c.file.clone(),
            lsn: c.lsn,
            chain_head: hex::encode(c.chain_head),
            digest: hex::encode(c.digest),
            bytes: c.bytes,
        }),
        segments,
        keyed_chain: config.manifest_key.is_some(),
        checkpoint_key_id: config.checkpoint_key_id_hex(),
        backup_floor_lsn: ms.backup_floor_lsn,
        durable_head: ms.durable_head.map(|d| DurableHeadRef {
            lsn: d.lsn,
            chain_hash: hex::encode(d.hash),
        }),
        manifest_key_id: config.manifest_key_id_hex(),
        tables: ms.tables.iter().map(table_ref).collect(),
        next_table_id: ms.next_table_id,
    };
    manifest::write(&*config.storage, dir, &body, config.manifest_key.as_ref())
}

pub(crate) fn table_ref(t: &LiveTable) -> TableRef {
    TableRef {
        id: t.id,
        file: t.file(),
        level: t.level,
        bytes: t.bytes,
        sha256: hex::encode(t.digest),
        entries: t.entries,
        first_key: hex::encode(&t.first_key),
        last_key: hex::encode(&t.last_key),
        min_seq: t.min_seq,
        max_seq: t.max_seq,
        key_id: (t.key_id != [0u8; 8]).then(|| hex::encode(t.key_id)),
    }
}

/// The manifest's table entries, checked for well-formedness (a signed manifest
/// that does not parse is corruption, not a reason to guess).
pub(crate) fn live_tables(dir: &Path, m: &ManifestBody) -> Result<Vec<LiveTable>, AedbError> {
    let bad = |r: &TableRef, what: &str| {
        AedbError::corruption(
            dir.join(manifest::MANIFEST_FILE),
            0,
            format!("table {}: {what}", r.id),
        )
    };
    let mut out = Vec::with_capacity(m.tables.len());
    for r in &m.tables {
        let hex_array = |s: &str| hex::decode(s).ok();
        let digest = hex_array(&r.sha256)
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| bad(r, "sha256 is not a 32-byte hex digest"))?;
        let key_id = match &r.key_id {
            None => [0u8; 8],
            Some(k) => hex_array(k)
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| bad(r, "key_id is not 8 hex-encoded bytes"))?,
        };
        let first_key = hex_array(&r.first_key).ok_or_else(|| bad(r, "first_key is not hex"))?;
        let last_key = hex_array(&r.last_key).ok_or_else(|| bad(r, "last_key is not hex"))?;
        if r.file != crate::table::file_name(r.id)
            || r.id == 0
            || r.id >= m.next_table_id
            || r.level > 1
        {
            return Err(bad(r, "file name, id or level out of place"));
        }
        if out.iter().any(|t: &LiveTable| t.id == r.id) {
            return Err(bad(r, "listed twice"));
        }
        out.push(LiveTable {
            id: r.id,
            level: r.level,
            bytes: r.bytes,
            digest,
            entries: r.entries,
            first_key,
            last_key,
            min_seq: r.min_seq,
            max_seq: r.max_seq,
            key_id,
        });
    }
    Ok(out)
}

/// What replay starts from and must reach: the checkpoint, the durable head and
/// segments the manifest records, and the head the configuration expects.
pub(crate) fn replay_start(
    dir: &Path,
    config: &AedbConfig,
    manifest: Option<&ManifestBody>,
    checkpoint: Option<&CheckpointMeta>,
    read_only: bool,
) -> Result<ReplayStart, AedbError> {
    let durable_head = match manifest.and_then(|m| m.durable_head.as_ref()) {
        Some(d) => {
            let hash = hex::decode(&d.chain_hash)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    AedbError::corruption(
                        dir.join(manifest::MANIFEST_FILE),
                        0,
                        "durable_head.chain_hash is not a 32-byte hex hash",
                    )
                })?;
            Some(ChainHead { lsn: d.lsn, hash })
        }
        None => None,
    };
    let listed_segments = manifest.and_then(|m| {
        let first = m.segments.iter().map(|s| s.index).min()?;
        let last = m.segments.iter().map(|s| s.index).max()?;
        Some((first, last))
    });
    let mut foreign = Vec::new();
    for s in manifest.map_or(&[][..], |m| &m.segments[..]) {
        let Some(sealed) = &s.sealed else { continue };
        let (Some(id), Some(sha)) = (&sealed.chain_key_id, &sealed.sha256) else {
            continue;
        };
        let key_id = hex::decode(id)
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok());
        let sha256 = hex::decode(sha)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
        let (Some(key_id), Some(sha256)) = (key_id, sha256) else {
            return Err(AedbError::corruption(
                dir.join(manifest::MANIFEST_FILE),
                0,
                format!(
                    "segment {}: chain_key_id must be 8 and sha256 32 hex-encoded bytes",
                    s.file
                ),
            ));
        };
        foreign.push((s.index, ForeignChain { key_id, sha256 }));
    }
    Ok(ReplayStart {
        checkpoint: checkpoint.map(|m| (m.lsn, m.chain_head)),
        read_only,
        durable_head,
        listed_segments,
        expected_head: config.expected_head,
        foreign,
    })
}

/// What the manifest and its checkpoint say about a data directory.
pub(crate) struct Loaded {
    pub manifest: Option<ManifestBody>,
    pub checkpoint: Option<(LoadedState, CheckpointMeta)>,
    /// The manifest verified only under the previous manifest key (a rotation).
    pub manifest_under_previous_key: bool,
    /// The tables the manifest lists (open beneath `checkpoint`'s state).
    pub tables: Vec<LiveTable>,
    pub next_table_id: u64,
    /// The block cache the tables read through (`AedbConfig::cache_bytes`).
    pub cache: std::sync::Arc<BlockCache>,
}

/// Reads the manifest, the checkpoint it names and the tables it lists (opened
/// beneath the checkpoint's state, their data not read; with `read_only`, as `aedb
/// check invariants` does, every block of every table is verified). Unless `read_only`, removes files the
/// manifest shows to be obsolete (left by a crash after a checkpoint).
pub(crate) fn load_manifest_and_checkpoint(
    dir: &Path,
    config: &AedbConfig,
    read_only: bool,
) -> Result<Loaded, AedbError> {
    let strict = config.recovery == RecoveryMode::Strict;
    let fs = &*config.storage;
    let read = manifest::read_any(
        fs,
        dir,
        config.manifest_key.as_ref(),
        config.previous_manifest_key.as_ref(),
    );
    let (body, manifest_under_previous_key) = match read {
        Ok(Some((b, by))) => (Some(b), by == manifest::SignedBy::Previous),
        Ok(None) => (None, false),
        Err(e) if !strict => {
            tracing::warn!(error = %e, "permissive recovery: ignoring an unusable manifest");
            (None, false)
        }
        Err(e) => return Err(e),
    };
    let keys = config.checkpoint_read_keys();
    let checkpoints = checkpoint::list(fs, dir)?;
    let segments = list_segments(fs, dir)?;
    let named: Option<(PathBuf, Option<&CheckpointRef>)> = match &body {
        Some(m) => m.checkpoint.as_ref().map(|c| (dir.join(&c.file), Some(c))),
        None => {
            let fresh = checkpoints.is_empty()
                && (segments.is_empty()
                    || (segments.len() == 1 && segment_is_empty(fs, &segments[0].1)));
            if !fresh {
                if strict {
                    return Err(AedbError::corruption(
                        dir.join(manifest::MANIFEST_FILE),
                        0,
                        "missing while the directory holds WAL segments or checkpoints",
                    ));
                }
                tracing::warn!(
                    "permissive recovery: no manifest; using the newest checkpoint, if any"
                );
            }
            checkpoints.last().map(|(_, p)| (p.clone(), None))
        }
    };
    let mut meta = None;
    if let Some((path, reference)) = named {
        let (loaded, m) = checkpoint::read(fs, &path, &keys)?;
        if let Some(r) = reference
            && (hex::encode(m.digest) != r.digest || m.lsn != r.lsn)
        {
            return Err(AedbError::corruption(
                &path,
                0,
                "checkpoint does not match the digest the manifest records (replaced or altered)",
            ));
        }
        meta = Some((loaded, m));
    }
    let tables = match (&body, &meta) {
        (Some(m), _) => live_tables(dir, m)?,
        (None, Some((_, c))) if !strict => tables_without_manifest(config, dir, c.lsn)?,
        (None, _) => Vec::new(),
    };
    let cache = std::sync::Arc::new(BlockCache::new(config.cache_bytes));
    if !tables.is_empty() {
        let Some((loaded, c)) = meta.as_mut() else {
            return Err(AedbError::corruption(
                dir.join(manifest::MANIFEST_FILE),
                0,
                "lists table files but no checkpoint (their catalog)",
            ));
        };
        // Only the tables' footers, indexes and bloom filters are read: the data
        // stays on disk, read block by block through the cache.
        let signed = config.manifest_key.is_some();
        let readers = lsm::open_tables(fs, dir, &tables, &keys, &cache, read_only, signed)?;
        let mut open: Vec<std::sync::Arc<OpenTable>> = tables
            .iter()
            .cloned()
            .zip(readers)
            .map(|(meta, reader)| {
                let path = dir.join(meta.file());
                std::sync::Arc::new(OpenTable::new(meta, reader, config.storage.clone(), path))
            })
            .collect();
        // The manifest lists tables oldest first.
        open.reverse();
        loaded.state.tables = std::sync::Arc::new(TableSet {
            tables: open,
            flushed_seq: c.lsn,
        });
        if !loaded.counts || body.is_none() {
            lsm::count_live(&mut loaded.state)?;
        }
    }
    // Checkpoints other than the live one, and segments before the first live one,
    // are leftovers of a checkpoint interrupted after its manifest was written.
    if let Some(m) = body.as_ref().filter(|_| !read_only) {
        for (_, p) in &checkpoints {
            let is_live = meta
                .as_ref()
                .is_some_and(|(_, c)| p.file_name().is_some_and(|n| n.to_string_lossy() == c.file));
            if !is_live {
                fs.remove_file(p).map_err(|e| AedbError::io(p, e))?;
            }
        }
        // Tables not listed were written by a flush or compaction whose manifest
        // switch did not happen, or replaced by one that did.
        for e in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
            let Some(id) = crate::table::parse_file_name(&e.name) else {
                continue;
            };
            if !e.is_dir && !tables.iter().any(|t| t.id == id) {
                let p = dir.join(&e.name);
                fs.remove_file(&p).map_err(|e| AedbError::io(&p, e))?;
            }
        }
        if let Some(first) = m.segments.first() {
            for (index, p) in &segments {
                if *index < first.index {
                    fs.remove_file(p).map_err(|e| AedbError::io(p, e))?;
                }
            }
        }
    }
    let next_table_id = body.as_ref().map_or_else(
        || tables.iter().map(|t| t.id + 1).max().unwrap_or(0),
        |m| m.next_table_id,
    );
    Ok(Loaded {
        manifest: body,
        checkpoint: meta,
        manifest_under_previous_key,
        tables,
        next_table_id,
        cache,
    })
}

/// Permissive recovery without a usable manifest: every table file present that
/// verifies in full and holds nothing after the checkpoint used (which a flush
/// writes after its tables, so whatever its tables' manifest switch replaced is
/// still here, and merging by version is right). A table that fails is skipped and
/// reported; its writes after the previous checkpoint are still in the WAL.
fn tables_without_manifest(
    config: &AedbConfig,
    dir: &Path,
    checkpoint_lsn: u64,
) -> Result<Vec<LiveTable>, AedbError> {
    let fs = &*config.storage;
    let keys = config.checkpoint_read_keys();
    let cache = std::sync::Arc::new(BlockCache::new(config.cache_bytes));
    let mut out = Vec::new();
    for e in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let Some(id) = crate::table::parse_file_name(&e.name).filter(|_| !e.is_dir) else {
            continue;
        };
        let path = dir.join(&e.name);
        match lsm::verify_table_file(fs, &path, id, &keys, &cache, None) {
            Ok(t) if t.max_seq <= checkpoint_lsn => out.push(t),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "permissive recovery: skipping a table written after the checkpoint used")
            }
            Err(err) => {
                tracing::warn!(file = %path.display(), error = %err, "permissive recovery: skipping a damaged table")
            }
        }
    }
    out.sort_by_key(|t| t.id);
    Ok(out)
}

/// Strict mode: every segment the manifest lists must exist with the same range
/// and, when sealed, the same final chain hash.
pub(crate) fn check_segments_against_manifest(
    dir: &Path,
    m: &ManifestBody,
    found: &[SealedSegment],
) -> Result<(), AedbError> {
    for s in &m.segments {
        let path = dir.join(&s.file);
        let Some(f) = found.iter().find(|f| f.index == s.index) else {
            return Err(AedbError::corruption(
                &path,
                0,
                "segment listed in the manifest is missing",
            ));
        };
        if f.first_lsn != s.first_lsn {
            return Err(AedbError::corruption(
                &path,
                0,
                format!(
                    "segment starts at LSN {}, the manifest says {}",
                    f.first_lsn, s.first_lsn
                ),
            ));
        }
        if let Some(sealed) = &s.sealed
            && (f.last_lsn != sealed.last_lsn || hex::encode(f.end_hash) != sealed.end_hash)
        {
            return Err(AedbError::corruption(
                &path,
                0,
                format!(
                    "sealed segment ends at LSN {}, the manifest says {} with another chain head (truncated or replaced)",
                    f.last_lsn, sealed.last_lsn
                ),
            ));
        }
    }
    Ok(())
}

/// Why `config` is unsafe for a secure (or production) open; empty when it is not.
pub(crate) fn secure_problems(config: &AedbConfig, production: bool) -> Vec<String> {
    let mut p = Vec::new();
    if config.manifest_key.is_none() {
        p.push(
            "no manifest key: use AedbConfig::production(key) or AedbConfig::low_latency(key)"
                .to_string(),
        );
    }
    if config.recovery == RecoveryMode::Permissive {
        p.push(
            "permissive recovery silently drops damaged log data: use RecoveryMode::Strict"
                .to_string(),
        );
    }
    if production && config.checkpoint_key.is_none() {
        p.push(
            "no checkpoint key: production requires encryption at rest (with_checkpoint_key)"
                .to_string(),
        );
    }
    if production && config.durability == DurabilityMode::OsBuffered {
        p.push("OsBuffered durability can lose acknowledged commits for an unbounded time: use Full or Batch".to_string());
    }
    p
}
