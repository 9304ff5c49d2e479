//! Opening a data directory: the manifest, the checkpoint it names, and the rules
//! that decide which files are live. Shared by `AedbInstance::open` and the
//! read-only inspection of the `aedb` CLI.

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, CheckpointMeta, LoadedState};
use crate::config::{AedbConfig, DurabilityMode, RecoveryMode};
use crate::error::AedbError;
use crate::manifest::{self, CheckpointRef, DurableHeadRef, ManifestBody, SealedRef, SegmentRef};
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
}

impl ManifestState {
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
    };
    manifest::write(&*config.storage, dir, &body, config.manifest_key.as_ref())
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
}

/// Reads the manifest and the checkpoint it names. Unless `read_only`, removes files
/// the manifest shows to be obsolete (left by a crash after a checkpoint).
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
        if let Some(first) = m.segments.first() {
            for (index, p) in &segments {
                if *index < first.index {
                    fs.remove_file(p).map_err(|e| AedbError::io(p, e))?;
                }
            }
        }
    }
    Ok(Loaded {
        manifest: body,
        checkpoint: meta,
        manifest_under_previous_key,
    })
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
