//! Full and incremental backups, chain verification, and strict restore.
//!
//! A backup is a directory holding member files and `backup.json`, a descriptor
//! signed with the manifest key (label `aedb backup v1`): its id, kind, parent (id
//! and descriptor SHA-256), LSN range, chain head at its end, every member with its
//! SHA-256, and the count and digest of every keyspace and table at its end LSN.
//!
//! - full: one checkpoint file of the state at `end_lsn` (encrypted when a
//!   checkpoint key is set), taken from an MVCC snapshot while writers continue;
//! - incremental: the WAL segments holding frames `start_lsn..=end_lsn`, copied up
//!   to the end of the last frame (frames stay encrypted and chained).
//!
//! Backups are written into `<dest>.partial` and renamed into place only when
//! complete, so an interrupted backup never looks like a finished one. Restore
//! assembles the chain in `<target>.restoring`, opens it strictly, checks LSN, chain
//! head and parity against the last descriptor, and only then renames it to the
//! target: nothing is ever half-restored.

#[cfg(test)]
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::check::{KeyspaceDigest, state_digests};
use crate::checkpoint;
use crate::config::{AedbConfig, RecoveryMode, SecretKey};
use crate::crypto::{self, LABEL_BACKUP};
use crate::error::{AedbError, NotFoundKind, RestoreError};
use crate::manifest::{read_signed_any, write_signed};
use crate::model::state::DbState;
use crate::storage::{OpenMode, SeqFile, Storage};
use crate::wal::format::{
    ChainHash, FRAME_HEADER_LEN, FrameAt, SEGMENT_HEADER_LEN, SegmentHeader, frame_at,
    parse_segment_file_name,
};
use crate::wal::keys::{SegmentChain, WalKeys};
use crate::wal::reader::scan_frames;
use crate::wal::writer::sync_dir;

pub const DESCRIPTOR_FILE: &str = "backup.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub backup_id: String,
    /// SHA-256 of the parent's `backup.json` as stored.
    pub descriptor_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupDescriptor {
    pub format_version: u32,
    pub backup_id: String,
    /// `full` or `incremental`.
    pub kind: String,
    pub parent: Option<ParentRef>,
    /// First LSN carried by this backup (0 for a full backup: it carries the state).
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub end_chain_head: String,
    pub members: Vec<Member>,
    pub keyspaces: Vec<KeyspaceDigest>,
    pub created_at: i64,
    pub keyed_chain: bool,
    pub checkpoint_key_id: Option<String>,
    /// Id of the manifest key that signs this descriptor (absent when unsigned,
    /// and in backups written before it was recorded): names the key a verify
    /// or restore needs after a manifest key rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_key_id: Option<String>,
}

/// What a backup call wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupReport {
    pub dir: PathBuf,
    pub backup_id: String,
    pub kind: String,
    pub start_lsn: u64,
    pub end_lsn: u64,
    pub bytes: u64,
    pub members: usize,
    pub duration_ms: u64,
}

/// Progress of a long backup: `phase`, and bytes done so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupProgress {
    pub phase: &'static str,
    pub bytes_done: u64,
}

/// One verified backup of a chain.
#[derive(Clone, Debug, Serialize)]
pub struct VerifiedBackup {
    pub dir: PathBuf,
    pub descriptor: BackupDescriptor,
    #[serde(skip)]
    descriptor_sha256: String,
}

/// What `verify_backup_chain` checked.
#[derive(Clone, Debug, Serialize)]
pub struct ChainReport {
    pub backups: Vec<VerifiedBackup>,
    pub end_lsn: u64,
    pub end_chain_head: String,
    pub frames_verified: u64,
}

/// What `restore_from_backup_chain` produced.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub target: PathBuf,
    pub backups: usize,
    pub end_lsn: u64,
    pub keyspaces: usize,
    pub duration_ms: u64,
}

/// The state a backup is taken from, captured under the commit lock.
pub(crate) struct Captured {
    pub state: std::sync::Arc<DbState>,
    pub chain_head: ChainHash,
}

fn sha256_file(fs: &dyn Storage, path: &Path) -> Result<(String, u64), AedbError> {
    let bytes = fs.read(path).map_err(|e| AedbError::io(path, e))?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes.len() as u64))
}

/// A destination that must reach stable storage before it counts: every file a
/// backup or a restore writes goes through [`write_synced`] / [`copy_synced`] on
/// one of these (a `File`, whose `sync` is `fsync`; tests inject a recorder).
pub(crate) trait SyncWrite: Write {
    fn sync(&mut self) -> std::io::Result<()>;
}

impl SyncWrite for SeqFile {
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

/// Writes `bytes` to `out`, then flushes and syncs it; only then is it `Ok`.
pub(crate) fn write_synced(out: &mut dyn SyncWrite, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(bytes)?;
    out.flush()?;
    out.sync()
}

/// Which side of a copy failed.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies `input` to `out` in 1 MiB pieces, showing each piece to `seen`
/// (hashing, progress), then flushes and syncs `out`. Returns the bytes copied.
pub(crate) fn copy_synced(
    input: &mut dyn std::io::Read,
    out: &mut dyn SyncWrite,
    seen: &mut dyn FnMut(&[u8]),
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        seen(&buf[..n]);
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
    out.flush().map_err(CopyError::Write)?;
    out.sync().map_err(CopyError::Write)?;
    Ok(total)
}

/// Creates (or truncates) `path` with `bytes`, fsynced before it returns `Ok`.
pub(crate) fn write_file_synced(
    fs: &dyn Storage,
    path: &Path,
    bytes: &[u8],
) -> Result<(), AedbError> {
    let mut f = SeqFile::new(
        fs.open(path, OpenMode::Create)
            .map_err(|e| AedbError::io(path, e))?,
    );
    write_synced(&mut f, bytes).map_err(|e| AedbError::io(path, e))?;
    synced::record(path);
    Ok(())
}

/// Copies `src` to `dst` (created or truncated), fsynced before it returns `Ok`;
/// `seen` is shown every piece copied. Returns the bytes copied.
pub(crate) fn copy_file_synced(
    fs: &dyn Storage,
    src: &Path,
    dst: &Path,
    seen: &mut dyn FnMut(&[u8]),
) -> Result<u64, AedbError> {
    let mut input = SeqFile::new(
        fs.open(src, OpenMode::Read)
            .map_err(|e| AedbError::io(src, e))?,
    );
    let mut output = SeqFile::new(
        fs.open(dst, OpenMode::Create)
            .map_err(|e| AedbError::io(dst, e))?,
    );
    let n = copy_synced(&mut input, &mut output, seen).map_err(|e| match e {
        CopyError::Read(e) => AedbError::io(src, e),
        CopyError::Write(e) => AedbError::io(dst, e),
    })?;
    synced::record(dst);
    Ok(n)
}

/// fsyncs every regular file under `dir` (files a strict open wrote into a
/// restore included), then the directories themselves, deepest first.
fn sync_tree(fs: &dyn Storage, dir: &Path) -> Result<(), AedbError> {
    for entry in fs.list_dir(dir).map_err(|e| AedbError::io(dir, e))? {
        let path = dir.join(&entry.name);
        if entry.is_dir {
            sync_tree(fs, &path)?;
        } else {
            fs.open(&path, OpenMode::Read)
                .and_then(|f| f.sync_all())
                .map_err(|e| AedbError::io(&path, e))?;
            synced::record(&path);
        }
    }
    sync_dir(fs, dir)
}

/// In unit tests, a per-thread log of the files this module fsynced (and of the
/// descriptor writes), so tests can check that every file of a backup or restore
/// was synced, and in which order. Compiled away otherwise.
#[cfg(test)]
pub(crate) mod synced {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local! {
        static LOG: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    pub fn record(path: &Path) {
        LOG.with(|l| l.borrow_mut().push(path.to_path_buf()));
    }

    pub fn take() -> Vec<PathBuf> {
        LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }
}

#[cfg(not(test))]
mod synced {
    #[inline(always)]
    pub fn record(_: &std::path::Path) {}
}

/// A staging directory next to `dest`: `dest` must be absent or an empty directory.
fn staging_for(fs: &dyn Storage, dest: &Path, suffix: &str) -> Result<PathBuf, AedbError> {
    if fs.exists(dest) {
        let empty = fs
            .list_dir(dest)
            .map_err(|e| AedbError::io(dest, e))?
            .is_empty();
        if !empty {
            return Err(AedbError::InvalidArgument(format!(
                "{} exists and is not empty; refusing to write into it",
                dest.display()
            )));
        }
    }
    let name = dest.file_name().ok_or_else(|| {
        AedbError::InvalidArgument(format!("{} has no file name", dest.display()))
    })?;
    let staging = dest.with_file_name(format!("{}.{suffix}", name.to_string_lossy()));
    if fs.exists(&staging) {
        // Left by an interrupted run of ours: never a complete result, safe to redo.
        fs.remove_dir_all(&staging)
            .map_err(|e| AedbError::io(&staging, e))?;
    }
    // `publish` fsyncs the staging directory's parent after the rename; the
    // parents above it must already be durable.
    crate::storage::create_dir_all_durable(fs, &staging).map_err(|e| AedbError::io(&staging, e))?;
    Ok(staging)
}

/// Moves a finished staging directory into place crash-safely.
fn publish(fs: &dyn Storage, staging: &Path, dest: &Path) -> Result<(), AedbError> {
    sync_dir(fs, staging)?;
    if fs.exists(dest) {
        fs.remove_dir(dest).map_err(|e| AedbError::io(dest, e))?;
    }
    fs.rename(staging, dest)
        .map_err(|e| AedbError::io(dest, e))?;
    sync_dir(fs, dest.parent().unwrap_or(Path::new(".")))
}

fn write_descriptor(
    fs: &dyn Storage,
    dir: &Path,
    d: &BackupDescriptor,
    key: Option<&SecretKey>,
) -> Result<(), AedbError> {
    let json = serde_json::to_string(d)
        .map_err(|e| AedbError::InvalidArgument(format!("descriptor encoding: {e}")))?;
    // write_signed writes a temp file, fsyncs it, renames it and fsyncs `dir`.
    let path = dir.join(DESCRIPTOR_FILE);
    write_signed(fs, &path, &json, key, LABEL_BACKUP)?;
    synced::record(&path);
    Ok(())
}

/// Reads and verifies one backup's descriptor signature and member hashes.
pub fn verify_backup_dir(config: &AedbConfig, dir: &Path) -> Result<VerifiedBackup, RestoreError> {
    verify_dir(config, dir).map_err(RestoreError::narrow)
}

pub(crate) fn verify_dir(config: &AedbConfig, dir: &Path) -> Result<VerifiedBackup, AedbError> {
    let fs = &*config.storage;
    let path = dir.join(DESCRIPTOR_FILE);
    // A backup taken before a manifest key rotation verifies under the previous key.
    let (body, _) = read_signed_any(
        fs,
        &path,
        config.manifest_key.as_ref(),
        config.previous_manifest_key.as_ref(),
        LABEL_BACKUP,
    )?
    .ok_or_else(|| {
        AedbError::corruption(
            &path,
            0,
            "backup descriptor missing (not a backup, or an interrupted one)",
        )
    })?;
    let d: BackupDescriptor = serde_json::from_str(&body)
        .map_err(|e| AedbError::corruption(&path, 0, format!("unreadable descriptor: {e}")))?;
    if d.format_version != FORMAT_VERSION {
        return Err(AedbError::corruption(
            &path,
            0,
            format!("unsupported backup format {}", d.format_version),
        ));
    }
    let stored = fs.read(&path).map_err(|e| AedbError::io(&path, e))?;
    for m in &d.members {
        if m.file.contains('/') || m.file.starts_with('.') {
            return Err(AedbError::corruption(
                &path,
                0,
                format!("member name {:?} is not a plain file name", m.file),
            ));
        }
        let mp = dir.join(&m.file);
        if !fs.try_exists(&mp).map_err(|e| AedbError::io(&mp, e))? {
            return Err(AedbError::corruption(&mp, 0, "backup member missing"));
        }
        let (sha, bytes) = sha256_file(fs, &mp)?;
        if sha != m.sha256 || bytes != m.bytes {
            return Err(AedbError::corruption(
                &mp,
                0,
                format!(
                    "backup member does not match its descriptor ({bytes} bytes; tampered, truncated or swapped)"
                ),
            ));
        }
    }
    Ok(VerifiedBackup {
        dir: dir.to_path_buf(),
        descriptor: d,
        descriptor_sha256: hex::encode(Sha256::digest(&stored)),
    })
}

/// The live files a full backup copies: the checkpoint (if any) and the WAL
/// segments (index, first LSN) in order. Taken with checkpoints held off.
pub(crate) struct LiveFiles {
    pub checkpoint: Option<crate::checkpoint::CheckpointMeta>,
    pub segments: Vec<(u64, u64)>,
    /// The table files the checkpoint's catalog goes with.
    pub tables: Vec<crate::lsm::LiveTable>,
}

/// Copies `src` to `dst` (fsynced) while hashing it; returns (sha256 hex, bytes).
fn copy_hashed(
    fs: &dyn Storage,
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(u64),
    done: &mut u64,
) -> Result<(String, u64), AedbError> {
    let mut h = Sha256::new();
    let total = copy_file_synced(fs, src, dst, &mut |piece| {
        h.update(piece);
        *done += piece.len() as u64;
        progress(*done);
    })?;
    Ok((hex::encode(h.finalize()), total))
}

/// Writes a full backup at `cap.state.seq`: a copy of the live checkpoint plus the
/// WAL segments after it up to that LSN (files, not a re-encoding: it runs at disk
/// speed and the data stays encrypted as stored). Restore loads the checkpoint and
/// replays the copied frames.
pub(crate) fn write_full(
    dest: &Path,
    data_dir: &Path,
    live: &LiveFiles,
    cap: &Captured,
    config: &AedbConfig,
    progress: &mut dyn FnMut(BackupProgress),
) -> Result<BackupReport, AedbError> {
    let started = Instant::now();
    let end_lsn = cap.state.seq;
    let fs = &*config.storage;
    let staging = staging_for(fs, dest, "partial")?;
    // The parity digests are computed while the files are copied.
    let (digests, copied) = std::thread::scope(|scope| {
        let digests = scope.spawn(|| state_digests(&cap.state));
        let copied = copy_live(fs, data_dir, &staging, live, end_lsn, &mut |b| {
            progress(BackupProgress {
                phase: "copy",
                bytes_done: b,
            })
        });
        (digests.join(), copied)
    });
    let digests =
        digests.map_err(|_| AedbError::InvalidArgument("digest thread panicked".into()))??;
    let (members, bytes, start) = copied?;
    let d = BackupDescriptor {
        format_version: FORMAT_VERSION,
        backup_id: hex::encode(crypto::random_bytes::<12>()?),
        kind: "full".into(),
        parent: None,
        start_lsn: 0,
        end_lsn,
        end_chain_head: hex::encode(cap.chain_head),
        members,
        keyspaces: digests,
        created_at: crate::audit::now_unix(),
        keyed_chain: config.manifest_key.is_some(),
        checkpoint_key_id: config.checkpoint_key_id_hex(),
        manifest_key_id: config.manifest_key_id_hex(),
    };
    write_descriptor(fs, &staging, &d, config.manifest_key.as_ref())?;
    verify_wal_members(config, &staging, &d, (start.0, &start.1))?;
    publish(fs, &staging, dest)?;
    progress(BackupProgress {
        phase: "done",
        bytes_done: bytes,
    });
    Ok(report(dest, &d, bytes, started.elapsed()))
}

/// What `copy_live` copied: the members, the bytes, and the (LSN, chain head) the
/// copied WAL continues from.
type Copied = (Vec<Member>, u64, (u64, String));

/// Copies the checkpoint and the WAL after it into `staging`.
fn copy_live(
    fs: &dyn Storage,
    data_dir: &Path,
    staging: &Path,
    live: &LiveFiles,
    end_lsn: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<Copied, AedbError> {
    let mut members = Vec::new();
    let mut done = 0u64;
    let start = match &live.checkpoint {
        Some(c) => {
            let (sha, bytes) = copy_hashed(
                fs,
                &data_dir.join(&c.file),
                &staging.join(&c.file),
                progress,
                &mut done,
            )?;
            members.push(Member {
                file: c.file.clone(),
                sha256: sha,
                bytes,
            });
            (c.lsn, hex::encode(c.chain_head))
        }
        None => (0, hex::encode([0u8; 32])),
    };
    // Tables are immutable: a copy is the file, checked against the digest the
    // manifest records.
    for t in &live.tables {
        let file = t.file();
        let (sha, bytes) = copy_hashed(
            fs,
            &data_dir.join(&file),
            &staging.join(&file),
            progress,
            &mut done,
        )?;
        if sha != hex::encode(t.digest) || bytes != t.bytes {
            return Err(AedbError::corruption(
                data_dir.join(&file),
                0,
                "table does not match the digest the manifest records",
            ));
        }
        members.push(Member {
            file,
            sha256: sha,
            bytes,
        });
    }
    for (i, (index, first)) in live.segments.iter().enumerate() {
        let next_first = live.segments.get(i + 1).map_or(u64::MAX, |(_, f)| *f);
        // Only segments holding frames after the checkpoint, up to the end LSN.
        if next_first <= start.0 + 1 || *first > end_lsn {
            continue;
        }
        let m = copy_segment_upto(fs, data_dir, staging, *index, end_lsn)?;
        done += m.bytes;
        progress(done);
        members.push(m);
    }
    Ok((members, done, start))
}

fn report(dest: &Path, d: &BackupDescriptor, bytes: u64, took: Duration) -> BackupReport {
    BackupReport {
        dir: dest.to_path_buf(),
        backup_id: d.backup_id.clone(),
        kind: d.kind.clone(),
        start_lsn: d.start_lsn,
        end_lsn: d.end_lsn,
        bytes,
        members: d.members.len(),
        duration_ms: took.as_millis() as u64,
    }
}

/// Copies segment `index` of `data_dir` into `staging`, cut after its last frame
/// with LSN <= `end_lsn` (the zero-filled rest is not backed up).
fn copy_segment_upto(
    fs: &dyn Storage,
    data_dir: &Path,
    staging: &Path,
    index: u64,
    end_lsn: u64,
) -> Result<Member, AedbError> {
    let name = crate::wal::format::segment_file_name(index);
    let src = data_dir.join(&name);
    let buf = fs.read(&src).map_err(|e| AedbError::io(&src, e))?;
    let end = end_of_frames_upto(&buf, end_lsn);
    write_file_synced(fs, &staging.join(&name), &buf[..end])?;
    Ok(Member {
        file: name,
        sha256: hex::encode(Sha256::digest(&buf[..end])),
        bytes: end as u64,
    })
}

/// Offset just past the last frame with LSN <= `end_lsn` in a segment buffer.
fn end_of_frames_upto(buf: &[u8], end_lsn: u64) -> usize {
    let mut pos = SEGMENT_HEADER_LEN;
    while let FrameAt::Frame(f) = frame_at(buf, pos) {
        if f.lsn > end_lsn {
            break;
        }
        pos += FRAME_HEADER_LEN + f.len as usize;
    }
    pos
}

/// Writes an incremental backup: the WAL segments of `data_dir` that hold frames
/// after the parent's end LSN up to `cap.state.seq`.
pub(crate) fn write_incremental(
    dest: &Path,
    parent: &Path,
    data_dir: &Path,
    segments: &[(u64, u64)],
    cap: &Captured,
    config: &AedbConfig,
    progress: &mut dyn FnMut(BackupProgress),
) -> Result<BackupReport, AedbError> {
    let started = Instant::now();
    let parent_v = verify_dir(config, parent)?;
    let p = &parent_v.descriptor;
    let end_lsn = cap.state.seq;
    if end_lsn < p.end_lsn {
        return Err(AedbError::InvalidArgument(format!(
            "parent backup ends at LSN {}, after this database's head {end_lsn} (a backup of another database?)",
            p.end_lsn
        )));
    }
    let start_lsn = p.end_lsn.saturating_add(1);
    // (index, first LSN) of live segments, in order; the ones we need overlap
    // start_lsn..=end_lsn.
    let mut needed = Vec::new();
    for (i, (index, first)) in segments.iter().enumerate() {
        let next_first = segments.get(i + 1).map_or(u64::MAX, |(_, f)| *f);
        if next_first > start_lsn && *first <= end_lsn {
            needed.push(*index);
        }
    }
    if start_lsn <= end_lsn && segments.first().is_none_or(|(_, f)| *f > start_lsn) {
        return Err(AedbError::InvalidArgument(format!(
            "the WAL after the parent backup (from LSN {start_lsn}) is no longer on disk; take a full backup"
        )));
    }
    let fs = &*config.storage;
    let staging = staging_for(fs, dest, "partial")?;
    let mut members = Vec::new();
    let mut total = 0u64;
    if start_lsn <= end_lsn {
        for index in needed {
            let m = copy_segment_upto(fs, data_dir, &staging, index, end_lsn)?;
            total += m.bytes;
            members.push(m);
            progress(BackupProgress {
                phase: "wal",
                bytes_done: total,
            });
        }
    }
    let d = BackupDescriptor {
        format_version: FORMAT_VERSION,
        backup_id: hex::encode(crypto::random_bytes::<12>()?),
        kind: "incremental".into(),
        parent: Some(ParentRef {
            backup_id: p.backup_id.clone(),
            descriptor_sha256: parent_v.descriptor_sha256.clone(),
        }),
        start_lsn,
        end_lsn,
        end_chain_head: hex::encode(cap.chain_head),
        members,
        keyspaces: state_digests(&cap.state)?,
        created_at: crate::audit::now_unix(),
        keyed_chain: config.manifest_key.is_some(),
        checkpoint_key_id: config.checkpoint_key_id_hex(),
        manifest_key_id: config.manifest_key_id_hex(),
    };
    write_descriptor(fs, &staging, &d, config.manifest_key.as_ref())?;
    // The copied frames must form exactly the promised range before we publish.
    verify_wal_members(config, &staging, &d, (p.end_lsn, &p.end_chain_head))?;
    publish(fs, &staging, dest)?;
    progress(BackupProgress {
        phase: "done",
        bytes_done: total,
    });
    Ok(report(dest, &d, total, started.elapsed()))
}

/// Checks that an incremental's segment copies carry frames `start..=end` that
/// continue the parent's chain head and end at the recorded one. Returns frames seen.
fn verify_wal_members(
    config: &AedbConfig,
    dir: &Path,
    d: &BackupDescriptor,
    (parent_lsn, parent_head): (u64, &str),
) -> Result<u64, AedbError> {
    let segments: Vec<&Member> = d
        .members
        .iter()
        .filter(|m| parse_segment_file_name(&m.file).is_some())
        .collect();
    if segments.is_empty() {
        // Nothing after the starting point: it must already be the end.
        if parent_lsn != d.end_lsn || parent_head != d.end_chain_head {
            return Err(AedbError::corruption(
                dir.join(DESCRIPTOR_FILE),
                0,
                format!(
                    "no WAL members, but the range runs from LSN {parent_lsn} to {}",
                    d.end_lsn
                ),
            ));
        }
        return Ok(0);
    }
    let keys = WalKeys::new(config.manifest_key.as_ref(), None, None)
        .with_previous_chain(config.previous_manifest_key.as_ref());
    let mut next_lsn = 0;
    let mut head = [0u8; 32];
    let mut frames = 0;
    let mut first = true;
    for m in segments {
        let path = dir.join(&m.file);
        let buf = config
            .storage
            .read(&path)
            .map_err(|e| AedbError::io(&path, e))?;
        let h = SegmentHeader::decode(&buf).map_err(|r| AedbError::corruption(&path, 0, r))?;
        if parse_segment_file_name(&m.file) != Some(h.index) {
            return Err(AedbError::corruption(
                &path,
                0,
                "segment header index does not match its name",
            ));
        }
        if h.first_lsn == 0 {
            return Err(AedbError::corruption(
                &path,
                0,
                "segment starts at LSN 0 (LSNs start at 1)",
            ));
        }
        if first {
            next_lsn = h.first_lsn;
            head = h.prev_hash;
            first = false;
        } else if h.first_lsn != next_lsn || h.prev_hash != head {
            return Err(AedbError::corruption(
                &path,
                0,
                "segment does not continue the previous member's chain",
            ));
        }
        if parent_lsn.checked_add(1) == Some(h.first_lsn) && hex::encode(h.prev_hash) != parent_head
        {
            return Err(AedbError::corruption(
                &path,
                0,
                "does not continue the parent backup's chain head",
            ));
        }
        // Segments copied across a manifest key rotation are chained under the
        // previous key: each is verified under the key its header names.
        let chain = match keys.chain_for(&h, &buf) {
            SegmentChain::Current(k) | SegmentChain::Previous(k, _) => Some(k),
            SegmentChain::Unknown(Some(id)) => {
                return Err(AedbError::KeyMismatch {
                    file: path,
                    reason: keys.unknown_chain_reason(Some(id)),
                });
            }
            // Unkeyed, or keyed under no configured key without a recorded id:
            // checked under the configured key, so any mismatch breaks the chain.
            SegmentChain::Plain | SegmentChain::Unknown(None) => keys.chain.as_ref(),
        };
        let mut link_err = None;
        let outcome = scan_frames(
            chain,
            &buf,
            SEGMENT_HEADER_LEN,
            next_lsn,
            head,
            |lsn, hash, _| {
                if lsn == parent_lsn && hex::encode(hash) != parent_head {
                    link_err = Some(lsn);
                    return Err("does not continue the parent backup's chain head".into());
                }
                if lsn >= d.start_lsn {
                    frames += 1;
                }
                Ok(())
            },
        );
        if let Some(damage) = outcome.damage {
            return Err(AedbError::corruption(&path, damage.offset, damage.reason));
        }
        // LSNs come from the descriptor and the files: no arithmetic may overflow.
        next_lsn = outcome.last_lsn.checked_add(1).ok_or_else(|| {
            AedbError::corruption(
                &path,
                outcome.end_offset,
                "LSN beyond the last possible one",
            )
        })?;
        head = outcome.chain_head;
    }
    if d.end_lsn.checked_add(1) != Some(next_lsn) || hex::encode(head) != d.end_chain_head {
        return Err(AedbError::corruption(
            dir.join(DESCRIPTOR_FILE),
            0,
            format!(
                "WAL members end at LSN {}, the descriptor says {} (or a different chain head)",
                next_lsn.saturating_sub(1),
                d.end_lsn
            ),
        ));
    }
    Ok(frames)
}

/// Verifies a chain (full first, then incrementals in order) without restoring:
/// signatures, member hashes, parent links, LSN continuity, the full backup's
/// checkpoint (decrypted and decoded), and every WAL frame's checksum and chain.
pub fn verify_backup_chain(
    config: &AedbConfig,
    chain: &[PathBuf],
) -> Result<ChainReport, RestoreError> {
    verify_chain(config, chain).map_err(RestoreError::narrow)
}

fn verify_chain(config: &AedbConfig, chain: &[PathBuf]) -> Result<ChainReport, AedbError> {
    let Some(first) = chain.first() else {
        return Err(AedbError::InvalidArgument("an empty backup chain".into()));
    };
    let full = verify_dir(config, first)?;
    if full.descriptor.kind != "full" || full.descriptor.parent.is_some() {
        return Err(AedbError::corruption(
            first.join(DESCRIPTOR_FILE),
            0,
            "a chain must start with a full backup",
        ));
    }
    let keys = config.checkpoint_read_keys();
    // The checkpoint (if the database had one) is authenticated and decoded; the
    // WAL members must continue its chain head up to the backup's end.
    let start = match full
        .descriptor
        .members
        .iter()
        .find(|m| checkpoint::parse_file_name(&m.file).is_some())
    {
        Some(ckpt) => {
            let (_, meta) = checkpoint::read(&*config.storage, &first.join(&ckpt.file), &keys)?;
            if meta.lsn > full.descriptor.end_lsn {
                return Err(AedbError::corruption(
                    first.join(&ckpt.file),
                    0,
                    "checkpoint is newer than the backup's end LSN",
                ));
            }
            (meta.lsn, hex::encode(meta.chain_head))
        }
        None => (0, hex::encode([0u8; 32])),
    };
    restored_tables(config, first, &full.descriptor)?;
    let mut frames = verify_wal_members(config, first, &full.descriptor, (start.0, &start.1))?;
    let mut backups = vec![full];

    for dir in &chain[1..] {
        let v = verify_dir(config, dir)?;
        let prev = &backups[backups.len() - 1];
        let d = &v.descriptor;
        let desc = dir.join(DESCRIPTOR_FILE);
        match &d.parent {
            Some(p)
                if p.backup_id == prev.descriptor.backup_id
                    && p.descriptor_sha256 == prev.descriptor_sha256 => {}
            _ => {
                return Err(AedbError::corruption(
                    &desc,
                    0,
                    format!(
                        "parent link does not name the previous backup in the chain ({}): missing, reordered or foreign",
                        prev.dir.display()
                    ),
                ));
            }
        }
        if d.kind != "incremental" || prev.descriptor.end_lsn.checked_add(1) != Some(d.start_lsn) {
            return Err(AedbError::corruption(
                &desc,
                0,
                format!(
                    "LSN range starts at {}, expected {} (gap or overlap)",
                    d.start_lsn,
                    prev.descriptor.end_lsn.saturating_add(1)
                ),
            ));
        }
        frames += verify_wal_members(
            config,
            dir,
            d,
            (prev.descriptor.end_lsn, &prev.descriptor.end_chain_head),
        )?;
        backups.push(v);
    }
    let last = &backups[backups.len() - 1].descriptor;
    Ok(ChainReport {
        end_lsn: last.end_lsn,
        end_chain_head: last.end_chain_head.clone(),
        frames_verified: frames,
        backups,
    })
}

/// Given a directory of backups, returns the chain ending at the newest backup
/// (following parent links back to its full backup).
pub fn discover_chain(root: &Path, config: &AedbConfig) -> Result<Vec<PathBuf>, RestoreError> {
    discover(root, config).map_err(RestoreError::narrow)
}

fn discover(root: &Path, config: &AedbConfig) -> Result<Vec<PathBuf>, AedbError> {
    let fs = &*config.storage;
    if fs.exists(&root.join(DESCRIPTOR_FILE)) {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut all = Vec::new();
    for e in fs.list_dir(root).map_err(|e| AedbError::io(root, e))? {
        let p = root.join(&e.name);
        if e.is_dir && fs.exists(&p.join(DESCRIPTOR_FILE)) {
            all.push(verify_dir(config, &p)?);
        }
    }
    let newest = all
        .iter()
        .max_by_key(|b| (b.descriptor.end_lsn, b.descriptor.created_at))
        .ok_or_else(|| AedbError::NotFound {
            kind: NotFoundKind::Backup,
            name: root.display().to_string(),
        })?;
    let mut chain = vec![newest.dir.clone()];
    let mut cur = newest;
    while let Some(p) = &cur.descriptor.parent {
        cur = all
            .iter()
            .find(|b| b.descriptor.backup_id == p.backup_id)
            .ok_or_else(|| AedbError::NotFound {
                kind: NotFoundKind::ParentBackup,
                name: format!("{} (parent of {})", p.backup_id, cur.dir.display()),
            })?;
        chain.push(cur.dir.clone());
    }
    chain.reverse();
    Ok(chain)
}

/// Restores a verified chain into `target` (absent or empty), strictly.
pub fn restore_from_backup_chain(
    config: &AedbConfig,
    chain: &[PathBuf],
    target: &Path,
) -> Result<RestoreReport, RestoreError> {
    restore_chain(config, chain, target).map_err(RestoreError::narrow)
}

fn restore_chain(
    config: &AedbConfig,
    chain: &[PathBuf],
    target: &Path,
) -> Result<RestoreReport, AedbError> {
    let started = Instant::now();
    let verified = verify_chain(config, chain)?;
    let fs = &*config.storage;
    let staging = staging_for(fs, target, "restoring")?;
    let result = assemble(config, &verified, &staging);
    if let Err(e) = result {
        let _ = fs.remove_dir_all(&staging);
        return Err(e);
    }
    publish(fs, &staging, target)?;
    let last = &verified.backups[verified.backups.len() - 1].descriptor;
    Ok(RestoreReport {
        target: target.to_path_buf(),
        backups: verified.backups.len(),
        end_lsn: verified.end_lsn,
        keyspaces: last.keyspaces.len(),
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// The table members of a full backup, each opened under the configured key it
/// is sealed under and verified block by block against its member digest, as
/// the manifest of a restore lists them.
fn restored_tables(
    config: &AedbConfig,
    dir: &Path,
    d: &BackupDescriptor,
) -> Result<Vec<crate::lsm::LiveTable>, AedbError> {
    let keys = config.checkpoint_read_keys();
    let cache = std::sync::Arc::new(crate::table::BlockCache::new(config.cache_bytes));
    let mut out = Vec::new();
    for m in &d.members {
        let Some(id) = crate::table::parse_file_name(&m.file) else {
            continue;
        };
        let path = dir.join(&m.file);
        let digest = hex::decode(&m.sha256)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| AedbError::corruption(&path, 0, "member digest is not SHA-256 hex"))?;
        out.push(crate::lsm::verify_table_file(
            &*config.storage,
            &path,
            id,
            &keys,
            &cache,
            Some(&digest),
        )?);
    }
    Ok(out)
}

fn assemble(config: &AedbConfig, chain: &ChainReport, staging: &Path) -> Result<(), AedbError> {
    let fs = &*config.storage;
    let full = &chain.backups[0];
    let ckpt = full
        .descriptor
        .members
        .iter()
        .find(|m| checkpoint::parse_file_name(&m.file).is_some());
    if let Some(m) = ckpt {
        copy_file_synced(
            fs,
            &full.dir.join(&m.file),
            &staging.join(&m.file),
            &mut |_| {},
        )?;
    }
    let tables = restored_tables(config, &full.dir, &full.descriptor)?;
    for t in &tables {
        let file = t.file();
        copy_file_synced(fs, &full.dir.join(&file), &staging.join(&file), &mut |_| {})?;
    }
    // Later copies of a segment extend earlier ones: keep the longest, and insist
    // that each earlier copy is a prefix of it.
    let mut segments: std::collections::BTreeMap<u64, (PathBuf, Vec<u8>)> =
        std::collections::BTreeMap::new();
    for b in &chain.backups {
        for m in &b.descriptor.members {
            let Some(index) = parse_segment_file_name(&m.file) else {
                continue;
            };
            let path = b.dir.join(&m.file);
            let bytes = fs.read(&path).map_err(|e| AedbError::io(&path, e))?;
            if let Some((_, earlier)) = segments.get(&index) {
                let n = earlier.len().min(bytes.len());
                if earlier[..n] != bytes[..n] {
                    return Err(AedbError::corruption(
                        &path,
                        0,
                        "differs from the same segment in an earlier backup",
                    ));
                }
                if earlier.len() > bytes.len() {
                    continue;
                }
            }
            segments.insert(index, (path, bytes));
        }
    }
    for (index, (_, bytes)) in &segments {
        let out = staging.join(crate::wal::format::segment_file_name(*index));
        write_file_synced(fs, &out, bytes)?;
    }
    // No manifest is copied: a restored database gets a fresh one, written by a
    // permissive-free, strict open of exactly these files.
    let keys = config.checkpoint_read_keys();
    let checkpoint_ref = match ckpt {
        Some(m) => {
            let (_, meta) = checkpoint::read(fs, &staging.join(&m.file), &keys)?;
            Some(crate::manifest::CheckpointRef {
                file: meta.file.clone(),
                lsn: meta.lsn,
                chain_head: hex::encode(meta.chain_head),
                digest: hex::encode(meta.digest),
                bytes: meta.bytes,
            })
        }
        None => None,
    };
    let body = crate::manifest::ManifestBody {
        format_version: crate::manifest::FORMAT_VERSION,
        generation: 0,
        checkpoint: checkpoint_ref,
        segments: Vec::new(),
        keyed_chain: config.manifest_key.is_some(),
        checkpoint_key_id: config.checkpoint_key_id_hex(),
        backup_floor_lsn: None,
        durable_head: None,
        manifest_key_id: config.manifest_key_id_hex(),
        next_table_id: tables.iter().map(|t| t.id + 1).max().unwrap_or(0),
        tables: tables.iter().map(crate::open::table_ref).collect(),
    };
    crate::manifest::write(fs, staging, &body, config.manifest_key.as_ref())?;
    let mut strict = config.clone();
    strict.recovery = RecoveryMode::Strict;
    strict.bootstrap_admin = None;
    strict.checkpoint_wal_bytes = None;
    strict.checkpoint_interval = None;
    // The strict open verifies checksums, chain, authentication and the
    // checkpoint; the state it loaded is then checked and compared directly.
    let db = crate::AedbInstance::open(strict, staging)?;
    let head = db.head_for_backup();
    let snap = db.snapshot()?;
    let failed: Vec<String> = crate::check::state_checks(&snap.state)
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    let digests = state_digests(&snap.state)?;
    drop(snap);
    db.close()?;
    // Everything in the restore is on stable storage before it is published:
    // the copies above were fsynced as written; this also covers whatever the
    // verification open wrote (manifest, a new segment) before it closed.
    sync_tree(fs, staging)?;
    let last = &chain.backups[chain.backups.len() - 1].descriptor;
    if head.0 != last.end_lsn || hex::encode(head.1) != last.end_chain_head {
        return Err(AedbError::corruption(
            staging,
            0,
            format!(
                "restored log ends at LSN {}, the chain at {}",
                head.0, last.end_lsn
            ),
        ));
    }
    if !failed.is_empty() {
        return Err(AedbError::corruption(
            staging,
            0,
            format!("restored database fails checks: {}", failed.join("; ")),
        ));
    }
    if digests != last.keyspaces {
        return Err(AedbError::corruption(
            staging,
            0,
            "restored state differs from the digests the backup recorded",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// What a recording sink saw, in order.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Write(usize),
        Flush,
        Sync,
    }

    #[derive(Default)]
    struct Recorder {
        events: Vec<Event>,
        fail_sync: bool,
    }

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.events.push(Event::Write(b.len()));
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.events.push(Event::Flush);
            Ok(())
        }
    }

    impl SyncWrite for Recorder {
        fn sync(&mut self) -> std::io::Result<()> {
            self.events.push(Event::Sync);
            if self.fail_sync {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            Ok(())
        }
    }

    /// The helpers sync after every write, exactly once, and report a failed
    /// sync as a failure (never as a written file).
    #[test]
    fn synced_helpers_sync_after_the_last_write() {
        let mut r = Recorder::default();
        write_synced(&mut r, b"hello").expect("write");
        assert_eq!(r.events.last(), Some(&Event::Sync));
        assert_eq!(r.events.iter().filter(|e| **e == Event::Sync).count(), 1);
        let written: usize = r
            .events
            .iter()
            .map(|e| if let Event::Write(n) = e { *n } else { 0 })
            .sum();
        assert_eq!(written, 5);

        // A copy of more than one buffer: several writes, then one sync at the end.
        let data = vec![7u8; (1 << 20) * 2 + 3];
        let mut r = Recorder::default();
        let mut seen = 0usize;
        let n = copy_synced(&mut &data[..], &mut r, &mut |p| seen += p.len()).expect("copy");
        assert_eq!((n as usize, seen), (data.len(), data.len()));
        let sync_at = r
            .events
            .iter()
            .position(|e| *e == Event::Sync)
            .expect("synced");
        assert_eq!(sync_at, r.events.len() - 1, "sync is the last thing done");
        assert!(
            r.events
                .iter()
                .filter(|e| matches!(e, Event::Write(_)))
                .count()
                >= 3
        );

        let mut r = Recorder {
            fail_sync: true,
            ..Recorder::default()
        };
        assert!(write_synced(&mut r, b"x").is_err());
        let mut r = Recorder {
            fail_sync: true,
            ..Recorder::default()
        };
        assert!(matches!(
            copy_synced(&mut &b"abc"[..], &mut r, &mut |_| {}),
            Err(CopyError::Write(_))
        ));
    }

    fn names(paths: &[PathBuf], under: &Path) -> Vec<String> {
        paths
            .iter()
            .filter(|p| p.parent() == Some(under))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }

    /// Every member of a backup is fsynced before the descriptor naming it is
    /// written, and every file of a restored database is fsynced before the
    /// restore reports success (bug 7: restore used to sync only directories).
    #[test]
    fn backups_and_restores_fsync_every_file_they_write() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let cfg = AedbConfig::development()
            .with_segment_bytes(256 * 1024)
            .with_limits(crate::Limits {
                max_txn_bytes: 64 * 1024,
                max_value_bytes: 16 * 1024,
                ..Default::default()
            });
        let db = crate::AedbInstance::open(cfg.clone(), &data).expect("open");
        db.create_project("p").expect("project");
        db.create_scope("p", "s").expect("scope");
        for i in 0..200u32 {
            db.kv_set("p", "s", format!("k{i}").as_bytes(), &[3; 500])
                .expect("set");
        }
        db.checkpoint().expect("checkpoint");
        for i in 200..400u32 {
            db.kv_set("p", "s", format!("k{i}").as_bytes(), &[4; 500])
                .expect("set");
        }
        let full = tmp.path().join("full");
        let inc = tmp.path().join("inc");
        let _ = synced::take();
        db.backup_full(&full).expect("full backup");
        let full_log = synced::take();
        for i in 400..500u32 {
            db.kv_set("p", "s", format!("k{i}").as_bytes(), &[5; 500])
                .expect("set");
        }
        db.backup_incremental(&inc, &full).expect("incremental");
        let inc_log = synced::take();
        db.close().expect("close");

        for (dir, log) in [(&full, &full_log), (&inc, &inc_log)] {
            let staging = dir.with_file_name(format!(
                "{}.partial",
                dir.file_name().expect("name").to_string_lossy()
            ));
            let order = names(log, &staging);
            let desc_at = order
                .iter()
                .position(|n| n == DESCRIPTOR_FILE)
                .expect("descriptor written");
            let d = verify_backup_dir(&cfg, dir).expect("verify").descriptor;
            assert!(!d.members.is_empty(), "{}: no members", dir.display());
            for m in &d.members {
                let at = order
                    .iter()
                    .position(|n| *n == m.file)
                    .unwrap_or_else(|| panic!("{} never fsynced ({order:?})", m.file));
                assert!(at < desc_at, "{} synced after the descriptor", m.file);
            }
        }

        let target = tmp.path().join("restored");
        restore_from_backup_chain(&cfg, &[full, inc], &target).expect("restore");
        let log = synced::take();
        let staging = tmp.path().join("restored.restoring");
        let synced_names: BTreeSet<String> = names(&log, &staging).into_iter().collect();
        let mut files = 0;
        for e in fs::read_dir(&target).expect("ls") {
            let e = e.expect("entry");
            if e.file_type().expect("type").is_file() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    synced_names.contains(&n),
                    "restored {n} was never fsynced (synced: {synced_names:?})"
                );
                files += 1;
            }
        }
        assert!(
            files >= 3,
            "a checkpoint, segments and a manifest were restored"
        );
        // The copies themselves were synced as they were written (before the
        // verification open), not only by the final sweep.
        let first_sweep = log
            .iter()
            .position(|p| p.file_name().is_some_and(|n| n == "MANIFEST"))
            .expect("manifest synced");
        assert!(
            log[..first_sweep]
                .iter()
                .any(|p| p.extension().is_some_and(|x| x == "ckpt")),
            "checkpoint copy synced when written: {log:?}"
        );
        assert!(
            log[..first_sweep]
                .iter()
                .any(|p| p.extension().is_some_and(|x| x == "seg")),
            "segment copies synced when written: {log:?}"
        );
    }
}
