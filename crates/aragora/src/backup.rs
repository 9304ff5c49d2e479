//! Online backups of the store while the server runs (writers keep going):
//! `aragora backup full|incremental --out DIR` through the control socket,
//! and the schedule (`ARAGORA_BACKUP_DIR`).
//!
//! A backup root holds one or more aedb chains and the key-ring backup
//! files, so the directory alone (with the master key and the aedb keys) is
//! restorable:
//!
//! ```text
//! DIR/0001-full/            aedb full backup (backup.json + members)
//! DIR/0002-incremental/     the log since 0001, and so on
//! DIR/keyring-backups/      copies of data/keyring-backups/keyring-*.json
//! ```
//!
//! Each backup also gets `DIR/NNNN-kind.keyring.json`, its pairing with the
//! key ring: the key-ring backup files the set held when it was taken, with
//! their SHA-256 (what `aragora drill` restores and checks with it).
//!
//! `aedb restore --from DIR --to NEW/aedb` restores the newest chain. The
//! schedule writes one such root per chain, `ARAGORA_BACKUP_DIR/chain-NNNN/`,
//! a new one every full interval, and keeps the newest few.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::clock::now_us;
use crate::config::BackupSchedule;
use crate::error::ServiceError;
use crate::metrics::ops::BackupMetrics;
use crate::store::{Store, StoreError};

/// The actor of scheduled backups in the audit log.
pub const SCHEDULE_ACTOR: &str = "system:backup-schedule";
const CHAIN_PREFIX: &str = "chain-";
const DESCRIPTOR: &str = "backup.json";
/// Where the key ring writes its backup files under the data dir (the same
/// name in a backup root).
const KEYRING_DIR: &str = "keyring-backups";
/// `DIR/<backup>.keyring.json`: a backup's pairing with the key ring.
const PAIRING_SUFFIX: &str = ".keyring.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    Full,
    Incremental,
}

impl BackupKind {
    pub fn name(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Incremental => "incremental",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error(
        "{root} holds no full backup to continue: run `aragora backup full --out {root}` first"
    )]
    NoChain { root: String },
    #[error("a backup is already running in this process")]
    Busy,
    #[error("the backup's descriptor {path} is unreadable: {reason}")]
    Descriptor { path: String, reason: String },
}

impl From<BackupError> for ServiceError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::NoChain { .. } => ServiceError::BadRequest(e.to_string()),
            BackupError::Busy => ServiceError::Conflict(e.to_string()),
            BackupError::Store(s) => s.into(),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

fn io(path: &Path, e: std::io::Error) -> BackupError {
    BackupError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// What one backup wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupOutcome {
    pub kind: BackupKind,
    /// The backup root (what `aedb restore --from` takes).
    pub root: String,
    /// This backup's directory in the root.
    pub dir: String,
    pub backup_id: String,
    pub start_lsn: u64,
    pub end_lsn: u64,
    /// `LSN:HASH` the backup ends at (compare with the server's logged
    /// `aedb chain head (anchor)` lines, or `aedb check invariants
    /// --expect-head` after a restore).
    pub chain_head: String,
    /// Files in the backup (members) and their bytes.
    pub files: usize,
    pub bytes: u64,
    pub duration_ms: u64,
    /// The chain this backup ends, full first (directory names in the root).
    pub chain: Vec<String>,
    /// Key-ring backup files copied into `root/keyring-backups` now, and how
    /// many it holds in all.
    pub keyring_files_copied: Vec<String>,
    pub keyring_files: usize,
    /// The side file pairing this backup with those key-ring backup files
    /// (`DIR/NNNN-kind.keyring.json`).
    #[serde(default)]
    pub keyring_pairing: String,
}

/// A backup's pairing with the key ring (`DIR/NNNN-kind.keyring.json`): the
/// key-ring backup files in `DIR/keyring-backups` when it was taken.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pairing {
    /// The backup's directory name in the root.
    pub backup: String,
    pub backup_id: String,
    pub end_lsn: u64,
    pub keyring_files: Vec<PairedFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairedFile {
    pub file: String,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Where the key-ring backup files of a backup root are.
pub(crate) fn keyring_dir(root: &Path) -> PathBuf {
    root.join(KEYRING_DIR)
}

/// The key-ring backup files a root holds now, with their hashes, by name.
fn keyring_files_in(root: &Path) -> Result<Vec<PairedFile>, BackupError> {
    let dir = keyring_dir(root);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(&dir, e)),
    };
    for e in entries {
        let e = e.map_err(|err| io(&dir, err))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("keyring-") || !name.ends_with(".json") || !e.path().is_file() {
            continue;
        }
        let bytes = fs::read(e.path()).map_err(|err| io(&e.path(), err))?;
        out.push(PairedFile {
            file: name,
            sha256: sha256_hex(&bytes),
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// Writes `root/<name>.keyring.json` (owner-only, replaced atomically).
fn write_pairing(root: &Path, pairing: &Pairing) -> Result<PathBuf, BackupError> {
    let path = root.join(format!("{}{PAIRING_SUFFIX}", pairing.backup));
    let tmp = root.join(format!(".{}{PAIRING_SUFFIX}.tmp", pairing.backup));
    let body = serde_json::to_vec_pretty(pairing).map_err(|e| BackupError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    write_private(&tmp, &path, &body)?;
    Ok(path)
}

/// Writes `bytes` to `path` owner-only and whole or not at all: into `tmp`,
/// fsynced, then renamed over `path`.
fn write_private(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| io(tmp, e))?;
    f.write_all(bytes).map_err(|e| io(tmp, e))?;
    f.sync_all().map_err(|e| io(tmp, e))?;
    fs::rename(tmp, path).map_err(|e| io(path, e))
}

/// The pairing recorded for backup `name` of `root` (`None`: a backup taken
/// before pairings were recorded).
pub(crate) fn read_pairing(root: &Path, name: &str) -> Result<Option<Pairing>, BackupError> {
    let path = root.join(format!("{name}{PAIRING_SUFFIX}"));
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path, e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| BackupError::Descriptor {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// The key-ring backup files a root holds now (for a backup without a
/// recorded pairing).
pub(crate) fn unpaired_keyring_files(root: &Path) -> Result<Vec<PairedFile>, BackupError> {
    keyring_files_in(root)
}

/// A backup chain found under a directory: its root and its backups' names,
/// full first.
#[derive(Clone, Debug)]
pub(crate) struct FoundChain {
    pub root: PathBuf,
    pub chain: Vec<String>,
}

/// The newest chain under `dir`: `dir` is a backup root (`aragora backup
/// --out DIR`) or the schedule's directory (`chain-NNNN/` roots, the highest
/// number holding a backup). `None`: no backup at all.
pub(crate) fn newest_chain(dir: &Path) -> Result<Option<FoundChain>, BackupError> {
    let roots = numbered(dir, |n| n.strip_prefix(CHAIN_PREFIX)?.parse().ok())?;
    let candidates: Vec<PathBuf> = if roots.is_empty() {
        vec![dir.to_path_buf()]
    } else {
        roots.iter().rev().map(|(_, n)| dir.join(n)).collect()
    };
    for root in candidates {
        let backups = backups_in(&root)?;
        if let Some((_, last)) = backups.last() {
            let chain = chain_of(&root, last)?;
            return Ok(Some(FoundChain { root, chain }));
        }
    }
    Ok(None)
}

/// The part of aedb's `backup.json` (first line: the descriptor JSON; second:
/// its signature, which `aedb verify`/`restore` check) shown to operators.
#[derive(Deserialize)]
struct Descriptor {
    backup_id: String,
    end_lsn: u64,
    end_chain_head: String,
    created_at: i64,
    #[serde(default)]
    parent: Option<ParentRef>,
}

#[derive(Deserialize)]
struct ParentRef {
    backup_id: String,
}

fn read_descriptor(dir: &Path) -> Result<Descriptor, BackupError> {
    let path = dir.join(DESCRIPTOR);
    let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let body = text.lines().next().unwrap_or_default();
    serde_json::from_str(body).map_err(|e| BackupError::Descriptor {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The backups of a root, `(seq, dir name)` in sequence order (`NNNN-kind`
/// directories holding a descriptor: an interrupted backup has none).
fn backups_in(root: &Path) -> Result<Vec<(u32, String)>, BackupError> {
    numbered(root, |name| {
        let (seq, kind) = name.split_once('-')?;
        (kind == "full" || kind == "incremental").then_some(())?;
        seq.parse().ok()
    })
    .map(|v| {
        v.into_iter()
            .filter(|(_, n)| root.join(n).join(DESCRIPTOR).is_file())
            .collect()
    })
}

fn numbered(
    root: &Path,
    parse: impl Fn(&str) -> Option<u32>,
) -> Result<Vec<(u32, String)>, BackupError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| io(root, e))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if e.path().is_dir()
            && let Some(seq) = parse(&name)
        {
            out.push((seq, name));
        }
    }
    out.sort();
    Ok(out)
}

fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}

/// Copies the key-ring backup files the root does not hold yet (never
/// rewriting one); returns the names copied and the count held.
fn copy_keyring_backups(data_dir: &Path, root: &Path) -> Result<(Vec<String>, usize), BackupError> {
    let src = data_dir.join(KEYRING_DIR);
    let dst = root.join(KEYRING_DIR);
    create_private_dir(&dst)?;
    let mut copied = Vec::new();
    if let Ok(entries) = fs::read_dir(&src) {
        for e in entries {
            let e = e.map_err(|e| io(&src, e))?;
            let name = e.file_name();
            let to = dst.join(&name);
            if !e.path().is_file() || to.exists() {
                continue;
            }
            let bytes = fs::read(e.path()).map_err(|err| io(&e.path(), err))?;
            let tmp = dst.join(format!(".{}.tmp", name.to_string_lossy()));
            write_private(&tmp, &to, &bytes)?;
            copied.push(name.to_string_lossy().into_owned());
        }
    }
    let held = fs::read_dir(&dst)
        .map_err(|e| io(&dst, e))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .count();
    copied.sort();
    Ok((copied, held))
}

#[derive(Debug)]
pub struct Backups {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    data_dir: PathBuf,
    metrics: BackupMetrics,
    /// One backup at a time: two would race for the root's next number.
    running: Mutex<()>,
}

/// `backup_created` / `backup_failed` details.
#[derive(Serialize)]
struct Audited<'a> {
    kind: &'static str,
    root: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_head: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Backups {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        data_dir: PathBuf,
        metrics: BackupMetrics,
    ) -> Self {
        Self {
            store,
            audit,
            data_dir,
            metrics,
            running: Mutex::new(()),
        }
    }

    /// A backup of `kind` into the root `root` (created if absent), audited
    /// as `backup_created` by `actor` (a failure as `backup_failed`, and
    /// counted either way it fails).
    pub fn run(
        &self,
        kind: BackupKind,
        root: &Path,
        actor: &str,
    ) -> Result<BackupOutcome, ServiceError> {
        let shown = root.display().to_string();
        let result = self
            .running
            .try_lock()
            .ok_or(BackupError::Busy)
            .and_then(|_held| self.write(kind, root));
        match result {
            Ok(outcome) => {
                let event =
                    AuditEvent::new("backup_created", actor, Outcome::Success).details(Audited {
                        kind: kind.name(),
                        root: &shown,
                        dir: Some(&outcome.dir),
                        chain_head: Some(&outcome.chain_head),
                        bytes: Some(outcome.bytes),
                        error: None,
                    });
                // The backup exists whatever the audit says; a lost entry is
                // the operator's to know (the command fails), not a reason
                // to count the backup as failed.
                self.audit.record(event)?;
                self.metrics
                    .last_success
                    .with_label_values(&[kind.name()])
                    .set(now_us() / 1_000_000);
                tracing::info!(
                    kind = kind.name(),
                    dir = %outcome.dir,
                    chain_head = %outcome.chain_head,
                    bytes = outcome.bytes,
                    actor,
                    "backup created"
                );
                Ok(outcome)
            }
            Err(e) => Err(self.failed(kind, root, actor, e)),
        }
    }

    /// A failed backup: counted, logged and audited as `backup_failed`.
    fn failed(&self, kind: BackupKind, root: &Path, actor: &str, e: BackupError) -> ServiceError {
        let shown = root.display().to_string();
        self.metrics
            .failures
            .with_label_values(&[kind.name()])
            .inc();
        tracing::error!(kind = kind.name(), root = %shown, error = %e, actor, "backup failed");
        let event = AuditEvent::new("backup_failed", actor, Outcome::Failure).details(Audited {
            kind: kind.name(),
            root: &shown,
            dir: None,
            chain_head: None,
            bytes: None,
            error: Some(e.to_string()),
        });
        if let Err(a) = self.audit.record(event) {
            tracing::error!(error = %a, "auditing a failed backup failed");
        }
        e.into()
    }

    fn write(&self, kind: BackupKind, root: &Path) -> Result<BackupOutcome, BackupError> {
        create_private_dir(root)?;
        let existing = backups_in(root)?;
        let parent = match kind {
            BackupKind::Full => None,
            BackupKind::Incremental => {
                Some(
                    existing
                        .last()
                        .cloned()
                        .ok_or_else(|| BackupError::NoChain {
                            root: root.display().to_string(),
                        })?,
                )
            }
        };
        let seq = existing.last().map_or(1, |(s, _)| s + 1);
        let name = format!("{seq:04}-{}", kind.name());
        let dest = root.join(&name);
        let parent_dir = parent.as_ref().map(|(_, n)| root.join(n));
        let report = self.store.engine_backup(&dest, parent_dir.as_deref())?;
        let d = read_descriptor(&dest)?;
        let chain = chain_of(root, &name)?;
        let (keyring_files_copied, keyring_files) = copy_keyring_backups(&self.data_dir, root)?;
        let pairing = write_pairing(
            root,
            &Pairing {
                backup: name.clone(),
                backup_id: d.backup_id.clone(),
                end_lsn: d.end_lsn,
                keyring_files: keyring_files_in(root)?,
            },
        )?;
        Ok(BackupOutcome {
            kind,
            root: root.display().to_string(),
            dir: dest.display().to_string(),
            backup_id: report.backup_id,
            start_lsn: report.start_lsn,
            end_lsn: report.end_lsn,
            chain_head: format!("{}:{}", d.end_lsn, d.end_chain_head),
            files: report.members,
            bytes: report.bytes,
            duration_ms: report.duration_ms,
            chain,
            keyring_files_copied,
            keyring_files,
            keyring_pairing: pairing.display().to_string(),
        })
    }

    /// One step of the schedule: a new chain when none is younger than the
    /// full interval, else an incremental when the newest backup is older
    /// than the incremental interval; then old chains beyond the retention
    /// are removed. `Ok(None)`: nothing was due.
    pub fn scheduled(&self, s: &BackupSchedule) -> Result<Option<BackupOutcome>, ServiceError> {
        let now = now_us() / 1_000_000;
        // A backup directory that cannot be read fails the backup that was
        // due (counted like any other failure); a full one is the safe guess.
        let chains = numbered(&s.dir, |n| n.strip_prefix(CHAIN_PREFIX)?.parse().ok())
            .map_err(|e| self.failed(BackupKind::Full, &s.dir, SCHEDULE_ACTOR, e))?;
        let newest = chains.last().map(|(seq, n)| (*seq, s.dir.join(n)));
        let age = |dir: &Path, first: bool| -> Option<i64> {
            let b = backups_in(dir).ok()?;
            let (_, name) = if first { b.first()? } else { b.last()? };
            read_descriptor(&dir.join(name))
                .ok()
                .map(|d| now - d.created_at)
        };
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let outcome = match &newest {
            Some((_, dir)) if age(dir, true).is_some_and(|a| a < secs(s.full_interval)) => {
                if age(dir, false).is_some_and(|a| a < secs(s.incremental_interval)) {
                    return Ok(None);
                }
                self.run(BackupKind::Incremental, dir, SCHEDULE_ACTOR)?
            }
            _ => {
                let seq = newest.as_ref().map_or(1, |(seq, _)| seq + 1);
                let dir = s.dir.join(format!("{CHAIN_PREFIX}{seq:04}"));
                self.run(BackupKind::Full, &dir, SCHEDULE_ACTOR)?
            }
        };
        self.prune(s);
        Ok(Some(outcome))
    }

    /// Removes the oldest chains beyond `retain_full` (logged; a chain that
    /// cannot be removed is left and retried next time).
    fn prune(&self, s: &BackupSchedule) {
        let Ok(chains) = numbered(&s.dir, |n| n.strip_prefix(CHAIN_PREFIX)?.parse().ok()) else {
            return;
        };
        let excess = chains.len().saturating_sub(s.retain_full);
        for (_, name) in chains.iter().take(excess) {
            let dir = s.dir.join(name);
            match fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dir = %dir.display(), "backup chain removed (retention)"),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing an old backup chain failed")
                }
            }
        }
    }
}

/// The chain ending at `last` in `root`: parent links back to the full.
fn chain_of(root: &Path, last: &str) -> Result<Vec<String>, BackupError> {
    let all = backups_in(root)?;
    let mut by_id = std::collections::HashMap::new();
    for (_, n) in &all {
        let d = read_descriptor(&root.join(n))?;
        by_id.insert(d.backup_id.clone(), (n.clone(), d));
    }
    let mut chain = vec![last.to_string()];
    let mut cur = read_descriptor(&root.join(last))?;
    while let Some(p) = cur.parent.take() {
        let Some((n, d)) = by_id.remove(&p.backup_id) else {
            break;
        };
        chain.push(n);
        cur = d;
    }
    chain.reverse();
    Ok(chain)
}

/// How often the schedule looks whether a backup is due.
/// The longest pause between attempts while scheduled backups keep failing.
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// The pause after `failures` consecutive failed scheduled backups: the poll
/// interval, doubled per failure up to [`MAX_FAILURE_BACKOFF`], so a broken
/// backup directory is retried (and audited, counted, logged) a few times an
/// hour rather than every poll.
pub fn retry_delay(poll: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return poll;
    }
    poll.saturating_mul(1u32 << failures.min(16))
        .min(MAX_FAILURE_BACKOFF)
        .max(poll)
}

pub fn poll_interval(s: &BackupSchedule) -> Duration {
    s.incremental_interval
        .min(s.full_interval)
        .min(Duration::from_secs(60))
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn failing_scheduled_backups_back_off_to_a_bound() {
        let poll = Duration::from_secs(60);
        assert_eq!(retry_delay(poll, 0), poll);
        assert_eq!(retry_delay(poll, 1), Duration::from_secs(120));
        assert_eq!(retry_delay(poll, 3), Duration::from_secs(480));
        assert_eq!(retry_delay(poll, 4), MAX_FAILURE_BACKOFF);
        assert_eq!(retry_delay(poll, 1000), MAX_FAILURE_BACKOFF);
        // A poll longer than the bound is never shortened.
        let slow = Duration::from_secs(3600);
        assert_eq!(retry_delay(slow, 5), slow);
    }
}
