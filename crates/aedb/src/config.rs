//! Engine configuration: durability, recovery strictness, limits and keys.

use std::fmt;
use std::time::Duration;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::AedbError;

/// How commits reach stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurabilityMode {
    /// Every commit is durable before it returns (group commit shares fsyncs).
    Full,
    /// Commits return once visible; a background flusher fsyncs within `batch_interval`.
    Batch,
    /// Commits are written to the OS page cache; fsync happens only for `Durable`
    /// finality, checkpoints and close.
    OsBuffered,
}

/// What recovery does with damage in the write-ahead log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Only a torn final frame is repaired; any other damage refuses to open.
    Strict,
    /// Keeps the longest valid prefix and reports exactly what was dropped.
    Permissive,
}

/// When a commit call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitFinality {
    /// Applied and visible to readers; fsync follows (bounded by the durability mode).
    Visible,
    /// Applied and on stable storage.
    Durable,
}

/// A 32-byte secret. Never printed; zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Explicit bounds on everything a caller can grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Encoded size of one transaction (one WAL frame).
    pub max_txn_bytes: usize,
    pub max_txn_ops: usize,
    /// Commits waiting for the commit lock or for an fsync.
    pub max_queued_commits: usize,
    /// Rows or keys returned by one scan or query call.
    pub max_scan_results: usize,
    /// Name length of projects, scopes, tables and columns.
    pub max_name_bytes: usize,
    /// Idempotency records kept (oldest evicted first).
    pub max_idempotency_records: usize,
    /// Recent snapshots kept for `ConsistencyMode::AtSeq`.
    pub snapshot_history: usize,
    /// Commits admitted per second (None: unlimited); excess fails fast with
    /// `Overloaded`.
    pub max_commits_per_sec: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 4 * 1024,
            max_value_bytes: 4 * 1024 * 1024,
            max_txn_bytes: 16 * 1024 * 1024,
            max_txn_ops: 100_000,
            max_queued_commits: 4_096,
            max_scan_results: 100_000,
            max_name_bytes: 128,
            max_idempotency_records: 100_000,
            snapshot_history: 64,
            max_commits_per_sec: None,
        }
    }
}

/// Default size of the block cache of table files.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// Configuration of an [`crate::AedbInstance`].
#[derive(Clone, Debug)]
pub struct AedbConfig {
    pub durability: DurabilityMode,
    pub recovery: RecoveryMode,
    /// Longest time a `Visible` commit stays only in memory under `Batch`.
    pub batch_interval: Duration,
    /// Size of one WAL segment file (preallocated, zero-filled).
    pub segment_bytes: u64,
    /// Automatic checkpoint once this many WAL bytes were written since the last
    /// one (None: never by size).
    pub checkpoint_wal_bytes: Option<u64>,
    /// Automatic checkpoint when this much time passed since the last one and
    /// something was committed (None: never by time).
    pub checkpoint_interval: Option<Duration>,
    pub limits: Limits,
    /// Longest wait to be admitted to the commit lock; a `Timeout` guarantees the
    /// commit was not applied.
    pub commit_timeout: Duration,
    /// Caller id made the first GlobalAdmin when the database has none yet.
    pub bootstrap_admin: Option<String>,
    /// A chain head recorded earlier (off the machine, see
    /// `AedbInstance::chain_head`): open refuses a directory whose log does not
    /// reach it (`AedbError::RolledBack`), in both recovery modes.
    pub expected_head: Option<crate::wal::ChainHead>,
    /// How often, at most, the manifest is rewritten to record how far the log is
    /// durable (None: only at open, segment rotation, checkpoints and close).
    /// Strict recovery refuses to open a log that lost frames up to the recorded
    /// head; frames acknowledged after it are protected only by their checksums.
    pub durable_head_interval: Option<Duration>,
    /// Where every file of the database, its backups and restores is read and
    /// written (`std::fs` unless `with_storage` says otherwise).
    pub storage: std::sync::Arc<dyn crate::storage::Storage>,
    /// Bytes of decrypted table blocks kept in memory (the block cache).
    pub cache_bytes: u64,
    pub(crate) manifest_key: Option<SecretKey>,
    pub(crate) checkpoint_key: Option<SecretKey>,
    /// The checkpoint key being rotated away from: still accepted for reading.
    pub(crate) previous_checkpoint_key: Option<SecretKey>,
    /// The manifest key being rotated away from: still accepted for verifying the
    /// manifest, WAL chain and backup descriptors signed or chained under it.
    pub(crate) previous_manifest_key: Option<SecretKey>,
}

impl AedbConfig {
    /// Development and tests: no keys, full durability, strict recovery.
    pub fn development() -> Self {
        Self {
            durability: DurabilityMode::Full,
            recovery: RecoveryMode::Strict,
            batch_interval: Duration::from_millis(5),
            segment_bytes: 64 * 1024 * 1024,
            checkpoint_wal_bytes: Some(64 * 1024 * 1024),
            checkpoint_interval: Some(Duration::from_secs(600)),
            limits: Limits::default(),
            commit_timeout: Duration::from_secs(10),
            bootstrap_admin: None,
            expected_head: None,
            durable_head_interval: Some(Duration::from_secs(1)),
            storage: crate::storage::os(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            manifest_key: None,
            checkpoint_key: None,
            previous_checkpoint_key: None,
            previous_manifest_key: None,
        }
    }

    /// Every commit durable before it returns; `key` signs the manifest.
    pub fn production(manifest_key: [u8; 32]) -> Self {
        Self::development().with_hmac_key(manifest_key)
    }

    /// Commits visible at once and fsynced within `batch_interval`; `key` signs the manifest.
    pub fn low_latency(manifest_key: [u8; 32]) -> Self {
        Self::development()
            .with_hmac_key(manifest_key)
            .with_durability(DurabilityMode::Batch)
    }

    /// Runs every file-system call through `storage` (fault tests use
    /// `FaultStorage`, a simulated disk with power-loss semantics).
    pub fn with_storage(mut self, storage: std::sync::Arc<dyn crate::storage::Storage>) -> Self {
        self.storage = storage;
        self
    }

    /// Sets the block cache's size (see [`AedbConfig::cache_bytes`]).
    pub fn with_cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    pub fn with_hmac_key(mut self, key: [u8; 32]) -> Self {
        self.manifest_key = Some(SecretKey::new(key));
        self
    }

    pub fn with_checkpoint_key(mut self, key: [u8; 32]) -> Self {
        self.checkpoint_key = Some(SecretKey::new(key));
        self
    }

    /// Key rotation: data written under `old` stays readable; the next checkpoint
    /// rewrites everything under the current checkpoint key.
    pub fn with_previous_checkpoint_key(mut self, old: [u8; 32]) -> Self {
        self.previous_checkpoint_key = Some(SecretKey::new(old));
        self
    }

    /// Manifest key rotation: a MANIFEST, WAL segments and backup descriptors
    /// signed or chained under `old` still verify. The first open re-signs the
    /// data directory under the current key (a checkpoint and a new manifest,
    /// before it accepts writes), after which `old` is needed only for backups
    /// taken before the rotation (FORMAT.md, "Key rotation").
    pub fn with_previous_manifest_key(mut self, old: [u8; 32]) -> Self {
        self.previous_manifest_key = Some(SecretKey::new(old));
        self
    }

    pub fn with_durability(mut self, durability: DurabilityMode) -> Self {
        self.durability = durability;
        self
    }

    pub fn with_recovery_mode(mut self, recovery: RecoveryMode) -> Self {
        self.recovery = recovery;
        self
    }

    pub fn with_batch_interval(mut self, interval: Duration) -> Self {
        self.batch_interval = interval;
        self
    }

    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Sets the automatic checkpoint policy; `(None, None)` turns it off.
    pub fn with_checkpoint_policy(
        mut self,
        wal_bytes: Option<u64>,
        interval: Option<Duration>,
    ) -> Self {
        self.checkpoint_wal_bytes = wal_bytes;
        self.checkpoint_interval = interval;
        self
    }

    /// One-time bootstrap: if the database has no GlobalAdmin yet, `caller_id`
    /// becomes one at open (recorded in `authz_audit`); ignored afterwards.
    pub fn with_bootstrap_admin(mut self, caller_id: impl Into<String>) -> Self {
        self.bootstrap_admin = Some(caller_id.into());
        self
    }

    /// Refuse to open unless the log reaches `head` (recorded earlier with
    /// `AedbInstance::chain_head` and kept off the machine): detects a stale but
    /// validly signed copy of the directory.
    pub fn with_expected_head(mut self, head: crate::wal::ChainHead) -> Self {
        self.expected_head = Some(head);
        self
    }

    /// See [`AedbConfig::durable_head_interval`].
    pub fn with_durable_head_interval(mut self, interval: Option<Duration>) -> Self {
        self.durable_head_interval = interval;
        self
    }

    pub fn with_commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keys that may decrypt checkpoints: the current one, then the one being
    /// rotated away from.
    pub(crate) fn checkpoint_read_keys(&self) -> Vec<&SecretKey> {
        [
            self.checkpoint_key.as_ref(),
            self.previous_checkpoint_key.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Public fingerprint (hex) of the checkpoint key, as files and manifests record it.
    pub(crate) fn checkpoint_key_id_hex(&self) -> Option<String> {
        self.checkpoint_key
            .as_ref()
            .map(|k| hex::encode(crate::crypto::key_id(k)))
    }

    /// Public fingerprint (hex) of the manifest key, as manifests record it.
    pub(crate) fn manifest_key_id_hex(&self) -> Option<String> {
        self.manifest_key
            .as_ref()
            .map(|k| hex::encode(crate::crypto::key_id(k)))
    }

    pub fn has_previous_manifest_key(&self) -> bool {
        self.previous_manifest_key.is_some()
    }

    pub fn has_previous_checkpoint_key(&self) -> bool {
        self.previous_checkpoint_key.is_some()
    }

    pub fn has_manifest_key(&self) -> bool {
        self.manifest_key.is_some()
    }

    pub fn has_checkpoint_key(&self) -> bool {
        self.checkpoint_key.is_some()
    }

    /// Finality used by [`crate::AedbInstance::commit`].
    pub fn default_finality(&self) -> CommitFinality {
        match self.durability {
            DurabilityMode::Full => CommitFinality::Durable,
            DurabilityMode::Batch | DurabilityMode::OsBuffered => CommitFinality::Visible,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), AedbError> {
        let mut problems = Vec::new();
        let l = &self.limits;
        let frame_room = crate::wal::format::SEGMENT_HEADER_LEN as u64
            + crate::wal::format::FRAME_HEADER_LEN as u64
            + l.max_txn_bytes as u64;
        if self.segment_bytes < frame_room {
            problems.push(format!(
                "segment_bytes ({}) must hold the largest transaction frame ({frame_room} bytes = max_txn_bytes + headers)",
                self.segment_bytes
            ));
        }
        if self.segment_bytes > 1 << 32 {
            problems.push(format!(
                "segment_bytes ({}) must be at most 4 GiB",
                self.segment_bytes
            ));
        }
        if l.max_key_bytes == 0 || l.max_key_bytes > 64 * 1024 {
            problems.push(format!(
                "max_key_bytes ({}) must be in 1..=65536",
                l.max_key_bytes
            ));
        }
        if l.max_value_bytes > l.max_txn_bytes {
            problems.push(format!(
                "max_value_bytes ({}) must not exceed max_txn_bytes ({})",
                l.max_value_bytes, l.max_txn_bytes
            ));
        }
        if l.max_txn_bytes > u32::MAX as usize / 2 {
            problems.push(format!(
                "max_txn_bytes ({}) must be below 2 GiB",
                l.max_txn_bytes
            ));
        }
        for (name, v) in [
            ("max_txn_ops", l.max_txn_ops),
            ("max_queued_commits", l.max_queued_commits),
            ("max_scan_results", l.max_scan_results),
            ("max_name_bytes", l.max_name_bytes),
        ] {
            if v == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if self.batch_interval.is_zero() || self.batch_interval > Duration::from_secs(10) {
            problems.push(format!(
                "batch_interval ({:?}) must be in (0, 10s]",
                self.batch_interval
            ));
        }
        if self.durable_head_interval.is_some_and(|i| i.is_zero()) {
            problems.push(
                "durable_head_interval must be above zero (None records the durable head only at open, rotation, checkpoint and close)"
                    .to_string(),
            );
        }
        if self.previous_manifest_key.is_some() && self.manifest_key.is_none() {
            problems.push(
                "a previous manifest key is set but no manifest key: rotating to unsigned is not supported"
                    .to_string(),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AedbError::InvalidConfig { problems })
        }
    }
}
