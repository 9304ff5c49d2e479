//! `AedbInstance`: opening (recovery), the commit path, and read snapshots.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex};

use crate::checkpoint::{self, CheckpointMeta};
use crate::config::{AedbConfig, CommitFinality, DurabilityMode, RecoveryMode, SecretKey};
use crate::error::AedbError;
use crate::lock::DirLock;
use crate::manifest::{self, CheckpointRef, ManifestBody, SealedRef, SegmentRef};
use crate::metrics::{Counters, OperationalMetrics, load};
use crate::model::state::DbState;
use crate::model::validate_name;
use crate::model::value::TableSchema;
use crate::record::{DdlOp, IdempotencyTag, WalRecord};
use crate::txn::snapshot::{ConsistencyMode, Snapshot};
use crate::txn::write::WriteTransaction;
use crate::wal::RecoveryReport;
use crate::wal::format::segment_file_name;
use crate::wal::keys::WalKeys;
use crate::wal::recovery::{ReplayStart, recover};
use crate::wal::recovery::{list_segments, segment_is_empty};
use crate::wal::writer::SealedSegment;
use crate::wal::writer::{HARD_BUFFER_BYTES, SOFT_BUFFER_BYTES, WalWriter};

/// What a successful commit reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitResult {
    /// Sequence number (= WAL LSN) of this commit.
    pub commit_seq: u64,
    /// Highest sequence number known durable when the call returned.
    pub durable_head_seq: u64,
    /// True when an idempotency key matched an earlier commit, which is what
    /// `commit_seq` then names; nothing was applied by this call.
    pub idempotent_replay: bool,
}

/// Writer-side state, guarded by the commit lock.
struct CommitState {
    state: DbState,
    idempotency: HashMap<IdempotencyTag, u64>,
    idempotency_order: VecDeque<IdempotencyTag>,
    history: VecDeque<Arc<DbState>>,
}

impl CommitState {
    fn remember(&mut self, tag: IdempotencyTag, seq: u64, max: usize) {
        if self.idempotency.insert(tag.clone(), seq).is_none() {
            self.idempotency_order.push_back(tag);
        }
        while self.idempotency_order.len() > max {
            if let Some(old) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&old);
            }
        }
    }
}

#[derive(Default)]
struct FlusherSignal {
    stop: bool,
    kicked: bool,
}

struct Flusher {
    signal: Arc<(Mutex<FlusherSignal>, Condvar)>,
    handle: JoinHandle<()>,
}

struct Inner {
    dir: PathBuf,
    config: AedbConfig,
    current: ArcSwap<DbState>,
    commit: Mutex<CommitState>,
    wal: Arc<WalWriter>,
    queued: AtomicUsize,
    counters: Counters,
    flusher: Mutex<Option<Flusher>>,
    recovery: RecoveryReport,
    closed: AtomicBool,
    manifest: Mutex<ManifestState>,
    /// One checkpoint at a time; close waits for a running one.
    checkpointing: Mutex<CheckpointState>,
    checkpointer: Arc<(Mutex<bool>, Condvar)>,
    _lock: DirLock,
}

/// What the manifest will say next time it is written.
struct ManifestState {
    generation: u64,
    checkpoint: Option<CheckpointMeta>,
    sealed: Vec<SealedSegment>,
    active_index: u64,
    active_first_lsn: u64,
}

struct CheckpointState {
    snapshot: Option<Arc<DbState>>,
    last_at: std::time::Instant,
    last_appended: u64,
    last_duration: Duration,
}

/// What `checkpoint()` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub file: PathBuf,
    pub lsn: u64,
    pub bytes: u64,
    pub duration: Duration,
    /// WAL segment files removed because the checkpoint covers them.
    pub segments_removed: usize,
}

/// An open database. `Send + Sync`: share it behind an `Arc`.
pub struct AedbInstance {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AedbInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AedbInstance")
            .field("dir", &self.inner.dir)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Holds one slot of the bounded commit queue.
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AedbInstance {
    /// Opens (creating if needed) the database in `dir`, replaying its log.
    pub fn open(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| AedbError::io(&dir, e))?;
        let lock = DirLock::acquire(&dir, true)?;

        let mut cs = CommitState {
            state: DbState::default(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            history: VecDeque::new(),
        };
        let max_idem = config.limits.max_idempotency_records;
        let (manifest_body, ckpt_meta) = load_manifest_and_checkpoint(&dir, &config, &mut cs)?;
        let keys = WalKeys::new(
            config.manifest_key.as_ref(),
            config.checkpoint_key.as_ref(),
            config.previous_checkpoint_key.as_ref(),
        );
        let start = ReplayStart {
            checkpoint: ckpt_meta.as_ref().map(|m| (m.lsn, m.chain_head)),
        };
        let recovered = recover(&dir, config.recovery, &keys, start, |lsn, payload| {
            let record = WalRecord::decode(payload).map_err(|e| e.to_string())?;
            cs.state
                .apply(&record, lsn)
                .map_err(|e| format!("frame at LSN {lsn} does not apply: {e}"))?;
            if let WalRecord::Commit {
                idempotency: Some(tag),
                ..
            } = record
            {
                cs.remember(tag, lsn, max_idem);
            }
            Ok(())
        })?;
        if let Some(m) = &manifest_body
            && config.recovery == RecoveryMode::Strict
        {
            check_segments_against_manifest(&dir, m, &recovered.segments)?;
        }
        let wal = match (recovered.position, recovered.last_header) {
            (Some(pos), Some(h)) if keys.writes_like(&h) => {
                WalWriter::resume(&dir, config.segment_bytes, keys, pos, &h)?
            }
            // Keys changed since the last segment was written: continue the chain in
            // a new segment under the current keys.
            (Some(pos), Some(_)) => WalWriter::create(
                &dir,
                config.segment_bytes,
                keys,
                pos.segment_index + 1,
                pos.last_lsn + 1,
                pos.chain_head,
            )?,
            _ => WalWriter::create(&dir, config.segment_bytes, keys, 1, 1, [0; 32])?,
        };
        let wal = Arc::new(wal);
        let (active_index, active_first_lsn) = wal.active_segment();
        let mut ms = ManifestState {
            generation: manifest_body.as_ref().map_or(0, |m| m.generation),
            checkpoint: ckpt_meta,
            sealed: recovered
                .segments
                .iter()
                .filter(|s| s.index < active_index)
                .cloned()
                .collect(),
            active_index,
            active_first_lsn,
        };
        write_manifest(&dir, &config, &mut ms)?;
        let published = Arc::new(cs.state.clone());
        cs.history.push_back(published.clone());
        if recovered.report.torn_tail.is_some() || recovered.report.dropped.is_some() {
            tracing::warn!(report = ?recovered.report, "recovery repaired the write-ahead log");
        }
        tracing::info!(dir = %dir.display(), seq = cs.state.seq, frames = recovered.report.frames_replayed, "aedb opened");

        let inner = Arc::new(Inner {
            dir,
            current: ArcSwap::new(published),
            commit: Mutex::new(cs),
            wal: wal.clone(),
            queued: AtomicUsize::new(0),
            counters: Counters::default(),
            flusher: Mutex::new(None),
            recovery: recovered.report,
            closed: AtomicBool::new(false),
            manifest: Mutex::new(ms),
            checkpointing: Mutex::new(CheckpointState {
                snapshot: None,
                last_at: std::time::Instant::now(),
                last_appended: 0,
                last_duration: Duration::ZERO,
            }),
            checkpointer: Arc::new((Mutex::new(false), Condvar::new())),
            _lock: lock,
            config,
        });
        *inner.flusher.lock() = Some(spawn_flusher(
            wal,
            inner.config.durability,
            inner.config.batch_interval,
        )?);
        spawn_checkpointer(&inner)?;
        Ok(Self { inner })
    }

    /// Opens for production paths: refuses any configuration that weakens
    /// integrity, listing every problem at once. Accepts both presets
    /// (`production(key)` and `low_latency(key)`).
    pub fn open_secure(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        let problems = secure_problems(&config, false);
        if !problems.is_empty() {
            return Err(AedbError::InvalidConfig { problems });
        }
        Self::open(config, dir)
    }

    /// `open_secure` plus encryption at rest: a checkpoint key is required too.
    pub fn open_production(config: AedbConfig, dir: impl AsRef<Path>) -> Result<Self, AedbError> {
        let problems = secure_problems(&config, true);
        if !problems.is_empty() {
            return Err(AedbError::InvalidConfig { problems });
        }
        Self::open(config, dir)
    }

    pub fn config(&self) -> &AedbConfig {
        &self.inner.config
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What recovery found and repaired when this instance opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// The latest committed state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            state: self.inner.current.load_full(),
        }
    }

    /// A read-only snapshot chosen by `mode`.
    pub fn begin_read(&self, mode: ConsistencyMode) -> Result<Snapshot, AedbError> {
        match mode {
            ConsistencyMode::AtLatest => Ok(self.snapshot()),
            ConsistencyMode::AtSeq(n) => {
                let cs = self.inner.commit.lock();
                let head = cs.state.seq;
                let oldest = cs.history.front().map_or(head, |s| s.seq);
                if n > head || n < oldest {
                    return Err(AedbError::SnapshotUnavailable {
                        requested: n,
                        oldest,
                        head,
                    });
                }
                // The state after commit n is the newest kept state with seq <= n.
                let state = cs
                    .history
                    .iter()
                    .rev()
                    .find(|s| s.seq <= n)
                    .cloned()
                    .ok_or(AedbError::SnapshotUnavailable {
                        requested: n,
                        oldest,
                        head,
                    })?;
                Ok(Snapshot { state })
            }
            ConsistencyMode::AtCheckpoint => self
                .inner
                .checkpointing
                .lock()
                .snapshot
                .clone()
                .map(|state| Snapshot { state })
                .ok_or_else(|| {
                    AedbError::InvalidArgument(
                        "no checkpoint has been written since this instance opened".into(),
                    )
                }),
        }
    }

    /// Starts a write transaction on `project`, reading from the latest state.
    pub fn begin_write(&self, project: &str) -> Result<WriteTransaction, AedbError> {
        let snapshot = self.snapshot();
        if !snapshot.state.projects.contains_key(project) {
            return Err(AedbError::NotFound {
                kind: "project",
                name: project.to_string(),
            });
        }
        Ok(WriteTransaction::new(
            project.to_string(),
            snapshot,
            self.inner.config.limits,
        ))
    }

    /// Commits with the configured default finality (`Durable` under
    /// `DurabilityMode::Full`, `Visible` otherwise).
    pub fn commit(&self, tx: WriteTransaction) -> Result<CommitResult, AedbError> {
        self.commit_with_finality(tx, self.inner.config.default_finality())
    }

    pub fn commit_with_finality(
        &self,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        let r = self.commit_inner(tx, finality);
        let c = &self.inner.counters;
        match &r {
            Ok(res) if res.idempotent_replay => Counters::bump(&c.idempotent_replays),
            Ok(_) => Counters::bump(&c.commits),
            Err(AedbError::Conflict { .. }) => Counters::bump(&c.aborts_conflict),
            Err(AedbError::AssertionFailed { .. }) => Counters::bump(&c.aborts_assertion),
            Err(AedbError::Overloaded { .. }) => Counters::bump(&c.aborts_admission),
            Err(_) => Counters::bump(&c.aborts_other),
        }
        r
    }

    fn admit(&self) -> Result<QueueSlot<'_>, AedbError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(AedbError::Closed);
        }
        let limit = self.inner.config.limits.max_queued_commits;
        let queued = self.inner.queued.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot(&self.inner.queued);
        if queued >= limit {
            return Err(AedbError::Overloaded { queued, limit });
        }
        Ok(slot)
    }

    fn commit_inner(
        &self,
        tx: WriteTransaction,
        finality: CommitFinality,
    ) -> Result<CommitResult, AedbError> {
        let _slot = self.admit()?;
        let tag = tx.idempotency_tag();
        let record = tx.to_record();
        // Encoding happens outside the commit lock: it does not depend on the LSN.
        let payload = record.encode()?;
        let limit = self.inner.config.limits.max_txn_bytes;
        if payload.len() > limit {
            return Err(AedbError::LimitExceeded {
                what: "encoded transaction bytes",
                limit,
                actual: payload.len(),
            });
        }

        let mut cs = self.inner.commit.lock();
        self.inner.wal.check_healthy()?;
        if let Some(seq) = tag.as_ref().and_then(|t| cs.idempotency.get(t).copied()) {
            drop(cs);
            return self.finish(seq, finality, true);
        }
        tx.check_conflicts(&cs.state)?;
        tx.check_assertions(&cs.state)?;
        if tx.is_empty() {
            let seq = cs.state.seq;
            drop(cs);
            return self.finish(seq, finality, false);
        }
        let seq = cs.state.seq + 1;
        let mut next = cs.state.clone();
        next.apply(&record, seq)?;
        let pending = self.inner.wal.append(seq, &payload)?;
        self.inner.record_rotation()?;
        cs.state = next;
        if let Some(tag) = tag {
            cs.remember(tag, seq, self.inner.config.limits.max_idempotency_records);
        }
        self.publish(&mut cs);
        drop(cs);
        self.bound_buffer(pending)?;
        self.finish(seq, finality, false)
    }

    fn publish(&self, cs: &mut CommitState) {
        let published = Arc::new(cs.state.clone());
        self.inner.current.store(published.clone());
        cs.history.push_back(published);
        while cs.history.len() > self.inner.config.limits.snapshot_history.max(1) {
            cs.history.pop_front();
        }
    }

    /// Keeps the in-memory WAL buffer bounded when commits do not wait for fsync.
    fn bound_buffer(&self, pending: usize) -> Result<(), AedbError> {
        if pending >= HARD_BUFFER_BYTES {
            self.inner.wal.write_out()?;
        } else if pending >= SOFT_BUFFER_BYTES
            && let Some(f) = self.inner.flusher.lock().as_ref()
        {
            f.signal.0.lock().kicked = true;
            f.signal.1.notify_one();
        }
        Ok(())
    }

    fn finish(
        &self,
        seq: u64,
        finality: CommitFinality,
        idempotent_replay: bool,
    ) -> Result<CommitResult, AedbError> {
        if finality == CommitFinality::Durable {
            self.inner.wal.wait_durable(seq)?;
        }
        Ok(CommitResult {
            commit_seq: seq,
            durable_head_seq: self.inner.wal.durable_lsn(),
            idempotent_replay,
        })
    }

    fn commit_ddl(&self, op: DdlOp) -> Result<CommitResult, AedbError> {
        let _slot = self.admit()?;
        let record = WalRecord::Ddl(op);
        let payload = record.encode()?;
        let mut cs = self.inner.commit.lock();
        self.inner.wal.check_healthy()?;
        let seq = cs.state.seq + 1;
        let mut next = cs.state.clone();
        next.apply(&record, seq)?;
        self.inner.wal.append(seq, &payload)?;
        self.inner.record_rotation()?;
        cs.state = next;
        self.publish(&mut cs);
        drop(cs);
        // Schema changes are rare and everything after them depends on them.
        self.finish(seq, CommitFinality::Durable, false)
    }

    fn name(&self, kind: &'static str, name: &str) -> Result<(), AedbError> {
        validate_name(kind, name, self.inner.config.limits.max_name_bytes)
    }

    pub fn create_project(&self, project: &str) -> Result<CommitResult, AedbError> {
        self.name("project", project)?;
        self.commit_ddl(DdlOp::CreateProject {
            project: project.to_string(),
        })
    }

    pub fn create_scope(&self, project: &str, scope: &str) -> Result<CommitResult, AedbError> {
        self.name("scope", scope)?;
        self.commit_ddl(DdlOp::CreateScope {
            project: project.to_string(),
            scope: scope.to_string(),
        })
    }

    pub fn create_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
        schema: TableSchema,
    ) -> Result<CommitResult, AedbError> {
        self.name("table", table)?;
        schema.validate(table, self.inner.config.limits.max_name_bytes)?;
        self.commit_ddl(DdlOp::CreateTable {
            project: project.to_string(),
            scope: scope.to_string(),
            table: table.to_string(),
            schema,
        })
    }

    pub fn drop_table(
        &self,
        project: &str,
        scope: &str,
        table: &str,
    ) -> Result<CommitResult, AedbError> {
        self.commit_ddl(DdlOp::DropTable {
            project: project.to_string(),
            scope: scope.to_string(),
            table: table.to_string(),
        })
    }

    /// One-key convenience write, committed with the default finality.
    pub fn kv_set(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<CommitResult, AedbError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_set(scope, key, value)?;
        self.commit(tx)
    }

    pub fn kv_del(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<CommitResult, AedbError> {
        let mut tx = self.begin_write(project)?;
        tx.kv_del(scope, key)?;
        self.commit(tx)
    }

    pub fn kv_get(
        &self,
        project: &str,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<Arc<[u8]>>, AedbError> {
        Ok(self.snapshot().kv(project, scope)?.get(key))
    }

    /// Writes a checkpoint of the current state, then removes the WAL segments and
    /// the older checkpoint it makes obsolete. Readers are never blocked; writers
    /// wait only while the state handle is taken.
    pub fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        self.inner.checkpoint()
    }

    /// Highest sequence number on stable storage.
    pub fn durable_head_seq(&self) -> u64 {
        self.inner.wal.durable_lsn()
    }

    /// Makes every commit so far durable (for `Visible` commits).
    pub fn sync(&self) -> Result<u64, AedbError> {
        let last = self.inner.wal.last_lsn();
        self.inner.wal.wait_durable(last)?;
        Ok(last)
    }

    pub fn operational_metrics(&self) -> OperationalMetrics {
        let c = &self.inner.counters;
        OperationalMetrics {
            commits: load(&c.commits),
            aborts_conflict: load(&c.aborts_conflict),
            aborts_assertion: load(&c.aborts_assertion),
            aborts_admission: load(&c.aborts_admission),
            aborts_other: load(&c.aborts_other),
            idempotent_replays: load(&c.idempotent_replays),
            fsyncs: self.inner.wal.fsyncs(),
            head_seq: self.inner.current.load().seq,
            durable_seq: self.inner.wal.durable_lsn(),
            queued_commits: self.inner.queued.load(Ordering::Relaxed) as u64,
            wal_pending_bytes: self.inner.wal.pending_bytes() as u64,
        }
    }

    /// Flushes and fsyncs everything and releases the directory lock.
    pub fn close(self) -> Result<(), AedbError> {
        self.inner.shutdown()
    }
}

impl Inner {
    /// Records segments sealed by the last append in the manifest (commit lock held).
    fn record_rotation(&self) -> Result<(), AedbError> {
        let sealed = self.wal.take_newly_sealed();
        if sealed.is_empty() {
            return Ok(());
        }
        let mut ms = self.manifest.lock();
        ms.sealed.extend(sealed);
        let (index, first) = self.wal.active_segment();
        ms.active_index = index;
        ms.active_first_lsn = first;
        write_manifest(&self.dir, &self.config, &mut ms)
    }

    fn checkpoint(&self) -> Result<CheckpointInfo, AedbError> {
        let mut ck = self.checkpointing.lock();
        let started = std::time::Instant::now();
        let (state, idempotency, chain_head) = {
            let cs = self.commit.lock();
            let state = cs
                .history
                .back()
                .cloned()
                .unwrap_or_else(|| Arc::new(cs.state.clone()));
            let idem: Vec<(IdempotencyTag, u64)> = cs
                .idempotency_order
                .iter()
                .filter_map(|t| cs.idempotency.get(t).map(|s| (t.clone(), *s)))
                .collect();
            (state, idem, self.wal.head().2)
        };
        // The checkpoint must never be ahead of the durable log.
        self.wal.wait_durable(state.seq)?;
        let appended = self.wal.appended_bytes();
        let meta = checkpoint::write(
            &self.dir,
            &state,
            &idempotency,
            chain_head,
            self.config.checkpoint_key.as_ref(),
        )?;
        let (old, obsolete) = {
            let mut ms = self.manifest.lock();
            let old = ms.checkpoint.replace(meta.clone());
            let (obsolete, keep): (Vec<_>, Vec<_>) =
                ms.sealed.drain(..).partition(|s| s.last_lsn <= meta.lsn);
            ms.sealed = keep;
            write_manifest(&self.dir, &self.config, &mut ms)?;
            (old, obsolete)
        };
        // Only now that the new manifest is durable are the old files garbage.
        for s in &obsolete {
            let p = self.dir.join(segment_file_name(s.index));
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove an obsolete segment");
            }
        }
        if let Some(old) = old.filter(|o| o.file != meta.file) {
            let p = self.dir.join(&old.file);
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), error = %e, "could not remove the old checkpoint");
            }
        }
        let duration = started.elapsed();
        ck.snapshot = Some(state);
        ck.last_at = std::time::Instant::now();
        ck.last_appended = appended;
        ck.last_duration = duration;
        tracing::info!(
            lsn = meta.lsn,
            bytes = meta.bytes,
            ?duration,
            removed = obsolete.len(),
            "checkpoint written"
        );
        Ok(CheckpointInfo {
            file: self.dir.join(&meta.file),
            lsn: meta.lsn,
            bytes: meta.bytes,
            duration,
            segments_removed: obsolete.len(),
        })
    }

    /// Whether the automatic policy calls for a checkpoint now.
    fn checkpoint_due(&self) -> bool {
        let ck = self.checkpointing.lock();
        let written = self.wal.appended_bytes().saturating_sub(ck.last_appended);
        if written == 0 {
            return false;
        }
        self.config
            .checkpoint_wal_bytes
            .is_some_and(|b| written >= b)
            || self
                .config
                .checkpoint_interval
                .is_some_and(|i| ck.last_at.elapsed() >= i)
    }

    fn shutdown(&self) -> Result<(), AedbError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        *self.checkpointer.0.lock() = true;
        self.checkpointer.1.notify_all();
        // Waits for a running checkpoint to finish.
        drop(self.checkpointing.lock());
        if let Some(f) = self.flusher.lock().take() {
            f.signal.0.lock().stop = true;
            f.signal.1.notify_one();
            let _ = f.handle.join();
        }
        self.wal.shutdown()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "aedb: final flush on drop failed");
        }
    }
}

/// Background thread bounding how long a `Visible` commit stays unsynced
/// (`Full`/`Batch`) or unwritten (`OsBuffered`).
fn spawn_flusher(
    wal: Arc<WalWriter>,
    mode: DurabilityMode,
    interval: Duration,
) -> Result<Flusher, AedbError> {
    let signal = Arc::new((Mutex::new(FlusherSignal::default()), Condvar::new()));
    let sig = signal.clone();
    let handle = std::thread::Builder::new()
        .name("aedb-flusher".into())
        .spawn(move || {
            loop {
                {
                    let mut s = sig.0.lock();
                    if !s.stop && !s.kicked {
                        sig.1.wait_for(&mut s, interval);
                    }
                    if s.stop {
                        return;
                    }
                    s.kicked = false;
                }
                let last = wal.last_lsn();
                // Errors poison the writer; committers see them on their next call.
                let _ = match mode {
                    DurabilityMode::OsBuffered => wal.write_out(),
                    DurabilityMode::Full | DurabilityMode::Batch => {
                        if wal.durable_lsn() < last {
                            wal.wait_durable(last)
                        } else {
                            Ok(())
                        }
                    }
                };
            }
        })
        .map_err(|e| AedbError::io("aedb-flusher thread", e))?;
    Ok(Flusher { signal, handle })
}

/// Runs the automatic checkpoint policy. Holds only a weak reference, so it never
/// keeps a dropped instance alive; it exits once the instance is gone or closed.
fn spawn_checkpointer(inner: &Arc<Inner>) -> Result<(), AedbError> {
    if inner.config.checkpoint_wal_bytes.is_none() && inner.config.checkpoint_interval.is_none() {
        return Ok(());
    }
    let weak = Arc::downgrade(inner);
    let stop = inner.checkpointer.clone();
    std::thread::Builder::new()
        .name("aedb-checkpointer".into())
        .spawn(move || {
            loop {
                {
                    let mut stopped = stop.0.lock();
                    if !*stopped {
                        stop.1.wait_for(&mut stopped, Duration::from_millis(500));
                    }
                    if *stopped {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if inner.closed.load(Ordering::Acquire) {
                    return;
                }
                if inner.checkpoint_due()
                    && let Err(e) = inner.checkpoint()
                {
                    tracing::error!(error = %e, "automatic checkpoint failed; will retry");
                }
            }
        })
        .map_err(|e| AedbError::io("aedb-checkpointer thread", e))?;
    Ok(())
}

fn write_manifest(
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
        checkpoint_key_id: config
            .checkpoint_key
            .as_ref()
            .map(|k| hex::encode(crate::crypto::key_id(k))),
    };
    manifest::write(dir, &body, config.manifest_key.as_ref())
}

/// Reads the manifest and the checkpoint it names into `cs`, and removes files the
/// manifest shows to be obsolete (left by a crash after a checkpoint).
fn load_manifest_and_checkpoint(
    dir: &Path,
    config: &AedbConfig,
    cs: &mut CommitState,
) -> Result<(Option<ManifestBody>, Option<CheckpointMeta>), AedbError> {
    let strict = config.recovery == RecoveryMode::Strict;
    let body = match manifest::read(dir, config.manifest_key.as_ref()) {
        Ok(b) => b,
        Err(e) if !strict => {
            tracing::warn!(error = %e, "permissive recovery: ignoring an unusable manifest");
            None
        }
        Err(e) => return Err(e),
    };
    let keys: Vec<&SecretKey> = [
        config.checkpoint_key.as_ref(),
        config.previous_checkpoint_key.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let checkpoints = checkpoint::list(dir)?;
    let segments = list_segments(dir)?;
    let named: Option<(PathBuf, Option<&CheckpointRef>)> = match &body {
        Some(m) => m.checkpoint.as_ref().map(|c| (dir.join(&c.file), Some(c))),
        None => {
            let fresh = checkpoints.is_empty()
                && (segments.is_empty()
                    || (segments.len() == 1 && segment_is_empty(&segments[0].1)));
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
        let (loaded, m) = checkpoint::read(&path, &keys)?;
        if let Some(r) = reference
            && (hex::encode(m.digest) != r.digest || m.lsn != r.lsn)
        {
            return Err(AedbError::corruption(
                &path,
                0,
                "checkpoint does not match the digest the manifest records (replaced or altered)",
            ));
        }
        cs.state = loaded.state;
        let max = config.limits.max_idempotency_records;
        for (tag, seq) in loaded.idempotency {
            cs.remember(tag, seq, max);
        }
        meta = Some(m);
    }
    // Checkpoints other than the live one, and segments before the first live one,
    // are leftovers of a checkpoint interrupted after its manifest was written.
    if let Some(m) = &body {
        for (_, p) in &checkpoints {
            let is_live = meta
                .as_ref()
                .is_some_and(|c| p.file_name().is_some_and(|n| n.to_string_lossy() == c.file));
            if !is_live {
                std::fs::remove_file(p).map_err(|e| AedbError::io(p, e))?;
            }
        }
        if let Some(first) = m.segments.first() {
            for (index, p) in &segments {
                if *index < first.index {
                    std::fs::remove_file(p).map_err(|e| AedbError::io(p, e))?;
                }
            }
        }
    }
    Ok((body, meta))
}

/// Strict mode: every segment the manifest lists must exist with the same range
/// and, when sealed, the same final chain hash.
fn check_segments_against_manifest(
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
fn secure_problems(config: &AedbConfig, production: bool) -> Vec<String> {
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
